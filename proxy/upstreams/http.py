"""A tenant's streamable-HTTP upstream (the Upstream protocol of upstreams/base.py).

It owns one connection pool per tenant (upstreams/http_client.py, HTTP/1.1 on aiohttp's own
parser), so connections and credentials are never shared between tenants. Redirects are never followed,
cookies are never kept, and only headers the proxy built itself go out: the client's token and any
client-sent tenant header never do.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from urllib.parse import urlsplit, urlunsplit

import structlog

from proxy import __version__
from proxy.config import UpstreamConfig
from proxy.protocol.errors import UpstreamError, UpstreamTimeout
from proxy.protocol.sse import Comment, Event, read_event_batches
from proxy.upstreams.base import UpstreamRequest
from proxy.upstreams.http_client import ConnectionPool, HttpClientError, HttpResponse

MAX_JSON_RESPONSE_BYTES = 32 * 1024 * 1024
MAX_EVENT_BYTES = 32 * 1024 * 1024

log = structlog.get_logger("proxy.upstreams.http")


def redacted_url(url: str) -> str:
    """The URL as a log may show it: without user and password, and without query values (an
    API key is often passed there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    query = (
        "&".join(f"{pair.partition('=')[0]}=..." for pair in parts.query.split("&")) if parts.query else ""
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def failure_reason(exc: BaseException) -> str:
    """What went wrong with a connection, in words (never the answer's content): the operating
    system's reason when there is one ("Connection refused")."""
    cause = exc.__cause__
    if isinstance(cause, OSError):
        return failure_reason(cause)
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class HttpUpstreamResponse:
    """One upstream HTTP answer; the caller reads it once and closes it."""

    def __init__(self, response: HttpResponse, max_bytes: int) -> None:
        self._response = response
        self._max_bytes = max_bytes
        self.status = response.status
        self.content_type = response.content_type
        self.session_id = response.headers.get("Mcp-Session-Id")
        self.retry_after = response.headers.get("Retry-After")

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
        except TimeoutError as exc:
            raise UpstreamTimeout() from exc
        except (HttpClientError, ConnectionError) as exc:
            raise UpstreamError("The upstream MCP server closed the connection mid-response") from exc
        return b"".join(chunks)

    async def events(self) -> AsyncIterator[list[Event | Comment]]:
        try:
            async for batch in read_event_batches(self._response.content, self._max_bytes):
                yield batch
        except TimeoutError as exc:
            raise UpstreamTimeout() from exc
        except (HttpClientError, ConnectionError) as exc:
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
        self.identity = f"http:{config.url}"
        self.config = config
        self._logged_url = redacted_url(config.url)
        base = {
            "User-Agent": f"mcp-tenant-proxy/{__version__}",
            "Accept-Encoding": "gzip, deflate",  # what aiohttp's client asked for: answers may be compressed
            **config.headers,
        }
        if config.tenant_header:
            base[config.tenant_header] = tenant
        self._base_headers: Mapping[str, str] = base
        self._pool = ConnectionPool(
            config.url,
            max_connections=config.max_connections,
            keepalive_seconds=config.keepalive_seconds,
            connect_timeout=config.connect_timeout_seconds,
            read_timeout=config.read_timeout_seconds,
        )

    @property
    def connections_in_use(self) -> int:
        return self._pool.in_use

    @property
    def connections_idle(self) -> int:
        return self._pool.idle

    async def send(self, request: UpstreamRequest) -> HttpUpstreamResponse:
        headers = {**request.headers, **self._base_headers}
        try:
            response = await self._pool.request(request.http_method, headers, request.body)
        except TimeoutError as exc:
            log.warning(
                "upstream_timeout", tenant=self.tenant, url=self._logged_url, phase="connect or answer"
            )
            raise UpstreamTimeout() from exc
        except (HttpClientError, OSError) as exc:
            log.warning("upstream_unreachable", tenant=self.tenant, url=self._logged_url,
                        reason=failure_reason(exc))  # fmt: skip
            raise UpstreamError("The upstream MCP server is unreachable") from exc
        if 300 <= response.status < 400:
            response.release()  # kept only when the answer was received to its end
            raise UpstreamError("The upstream MCP server answered with a redirect, which is never followed")
        return HttpUpstreamResponse(response, MAX_JSON_RESPONSE_BYTES)

    async def sweep(self) -> None:
        """Nothing to do: the pool closes idle connections itself."""

    async def close(self) -> None:
        await self._pool.close()
