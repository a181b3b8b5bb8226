"""A tenant's streamable-HTTP upstream (the Upstream protocol of upstreams/base.py).

The HTTP implementation owns one aiohttp ClientSession per tenant, so connection
pools, cookies and credentials are never shared between tenants. Redirects are never followed,
cookies are never kept, and only headers the proxy built itself go out: the client's token and any
client-sent tenant header never do.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

import aiohttp
import yarl

from proxy import __version__
from proxy.config import UpstreamConfig
from proxy.protocol.errors import UpstreamError, UpstreamTimeout
from proxy.protocol.sse import Comment, Event, read_event_batches
from proxy.upstreams.base import UpstreamRequest

MAX_JSON_RESPONSE_BYTES = 32 * 1024 * 1024
MAX_EVENT_BYTES = 32 * 1024 * 1024


class HttpUpstreamResponse:
    """One upstream HTTP answer; the caller reads it once and closes it."""

    def __init__(self, response: aiohttp.ClientResponse, max_bytes: int) -> None:
        self._response = response
        self._max_bytes = max_bytes
        self.status = response.status
        self.content_type = response.content_type
        self.session_id = response.headers.get("Mcp-Session-Id")

    async def read_json(self) -> bytes:
        if (self._response.content_length or 0) > self._max_bytes:
            raise UpstreamError("The upstream MCP server sent an oversized response")
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in self._response.content.iter_any():
                size += len(chunk)
                if size > self._max_bytes:
                    raise UpstreamError("The upstream MCP server sent an oversized response")
                chunks.append(chunk)
        except TimeoutError as exc:  # aiohttp's read timeout is also a ClientError: check it first
            raise UpstreamTimeout() from exc
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise UpstreamError("The upstream MCP server closed the connection mid-response") from exc
        return b"".join(chunks)

    async def events(self) -> AsyncIterator[list[Event | Comment]]:
        try:
            async for batch in read_event_batches(self._response.content, self._max_bytes):
                yield batch
        except TimeoutError as exc:
            raise UpstreamTimeout() from exc
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise UpstreamError("The upstream MCP server closed the stream") from exc

    def close(self) -> None:
        """Done with the answer: a fully read one gives its connection back to the pool."""
        self._response.release()


class HttpUpstream:
    """A tenant's HTTP upstream: its own connection pool, timeouts and credentials."""

    def __init__(self, tenant: str, config: UpstreamConfig) -> None:
        assert config.url is not None
        self.tenant = tenant
        self.url = config.url
        self._url = yarl.URL(config.url)  # parsed once, not on every request
        self.identity = f"http:{config.url}"
        self.config = config
        base = {"User-Agent": f"mcp-tenant-proxy/{__version__}", **config.headers}
        if config.tenant_header:
            base[config.tenant_header] = tenant
        self._base_headers: Mapping[str, str] = base
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=config.connect_timeout_seconds,
            sock_read=config.read_timeout_seconds,
        )
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self.config.max_connections,
                    keepalive_timeout=self.config.keepalive_seconds,
                    ttl_dns_cache=60,
                ),
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=self._timeout,
                auto_decompress=True,
                # No skip_auto_headers: the base headers carry User-Agent, and aiohttp's skip
                # list costs a sorted copy of the headers on every request.
            )
        return self._session

    async def send(self, request: UpstreamRequest) -> HttpUpstreamResponse:
        headers = {**request.headers, **self._base_headers}
        try:
            response = await self._client().request(
                request.http_method,
                self._url,
                data=request.body,
                headers=headers,
                allow_redirects=False,
            )
        except TimeoutError as exc:
            raise UpstreamTimeout() from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError("The upstream MCP server is unreachable") from exc
        if 300 <= response.status < 400:
            response.close()
            raise UpstreamError("The upstream MCP server answered with a redirect, which is never followed")
        return HttpUpstreamResponse(response, MAX_JSON_RESPONSE_BYTES)

    async def sweep(self) -> None:
        """Nothing to do: aiohttp's connector expires idle connections itself."""

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
            # Let aiohttp's connector finish closing its transports before the loop moves on.
            await asyncio.sleep(0)
