"""Which protocol eras a tenant's upstream speaks: learned once, so a 2026-07-28 request for a server
that speaks only the initialize handshake is bridged to it, or answered at once the way clients
expect.

Most servers speak 2025-11-25 at most, and SDK clients (the Python SDK's default `auto` mode, the
TypeScript SDK v2) open with a 2026-07-28 request and fall back to `initialize` on an unsupported-
version error. Forwarded to a handshake-only server, that request fails as a server fault (a 400
"Server not initialized", a stdio process that never becomes ready): a 5xx for the client, a
process started each time, the tenant's circuit opened. Instead, the first 2026-07-28 request asks
the upstream once, with the spec's own probe (server/discover):

    a DiscoverResult listing 2026-07-28, or -32022 naming it        -> it speaks 2026-07-28
    a DiscoverResult or -32022 naming none of it, -32601, HTTP
      400/404/405 without a modern error ("Server not initialized"),
      a stdio server answering with an error or not at all         -> handshake era only
    no answer (unreachable, 5xx, timeout, refused credentials) or
      one that says nothing (an internal error, a malformed result) -> nothing learned (asked again
                                                                       after a while)

and a handshake-only upstream's 2026-07-28 requests are bridged (bridge/), or with bridging off get
-32022 (HTTP 400) listing the versions the proxy serves that tenant, with no upstream call, no
process started and nothing for the circuit.
What was learned belongs to the tenant's runtime: a reload (or a restart) learns it again.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Final

import structlog

from proxy import __version__
from proxy.flow import Request
from proxy.protocol.errors import MethodNotFound, ProxyError, UnsupportedProtocolVersion
from proxy.protocol.jsonrpc import dumps, loads_upstream
from proxy.types import HANDSHAKE_VERSIONS, LATEST_MODERN_VERSION, MODERN_VERSIONS, JsonObject
from proxy.upstreams.base import JSON, Upstream, UpstreamRequest, UpstreamResponse, answer_to

log = structlog.get_logger("proxy.upstreams.eras")

ASK_AGAIN_SECONDS: Final = 5.0  # after a probe that learned nothing (the upstream did not answer)
_NOT_MODERN_STATUSES: Final = frozenset({400, 404, 405})  # what the spec's fallback rule names
_ids = itertools.count(1)


class UpstreamEras:
    """What one upstream was found to speak (None: not asked yet, or it did not answer)."""

    def __init__(self) -> None:
        self.modern: bool | None = None
        self._lock = asyncio.Lock()
        self._ask_after = 0.0

    async def speaks_modern(self, upstream: Upstream) -> bool | None:
        """Whether the upstream speaks 2026-07-28, probing it the first time (one probe at a time)."""
        if self.modern is not None or time.monotonic() < self._ask_after:
            return self.modern
        async with self._lock:
            if self.modern is None and time.monotonic() >= self._ask_after:
                self.modern = await probe(upstream)
                if self.modern is None:
                    self._ask_after = time.monotonic() + ASK_AGAIN_SECONDS
                else:
                    log.info("upstream_eras_learned", tenant=upstream.tenant, modern=self.modern)
        return self.modern


async def probe(upstream: Upstream) -> bool | None:
    """Ask the upstream server/discover: True (speaks 2026-07-28), False (handshake era only) or
    None (it did not answer: nothing can be concluded)."""
    request_id = f"mcp-tenant-proxy-discover-{next(_ids)}"
    meta = {
        "io.modelcontextprotocol/protocolVersion": LATEST_MODERN_VERSION,
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "mcp-tenant-proxy", "version": __version__},
    }
    body = {"jsonrpc": "2.0", "id": request_id, "method": "server/discover", "params": {"_meta": meta}}
    headers = {
        "Content-Type": JSON,
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": LATEST_MODERN_VERSION,
        "Mcp-Method": "server/discover",
    }
    try:
        response = await upstream.send(UpstreamRequest("POST", headers, dumps(body)))
    except ProxyError:  # (bounded by the upstream's own timeouts: connect, read, stdio readiness)
        return None
    try:
        return await _verdict(response, request_id)
    except ProxyError:
        return None
    finally:
        response.close()


async def _verdict(response: UpstreamResponse, request_id: str) -> bool | None:
    if response.status == 200:
        answer = await answer_to(response, request_id)
        return None if answer is None else _judged(answer)
    if response.status not in _NOT_MODERN_STATUSES:
        return None  # a failure (5xx), refused credentials, a limit: no verdict on the era
    judged: bool | None = None
    if response.content_type == JSON:
        try:
            answer = loads_upstream(await response.read_json())
        except ProxyError:
            answer = None
        if isinstance(answer, dict):
            judged = _judged(answer)
    return False if judged is None else judged  # 400/404/405 without a modern error: a handshake server


def _judged(answer: JsonObject) -> bool | None:
    """What an answer to server/discover says, as clients judge it: True (a DiscoverResult naming
    2026-07-28, or -32022 naming it), False (a result or -32022 naming none, -32601: every 2026-07-28
    server implements server/discover), None (anything else: an internal error says nothing)."""
    result, error = answer.get("result"), answer.get("error")
    if isinstance(result, dict):
        versions = result.get("supportedVersions")
        return any(v in MODERN_VERSIONS for v in versions) if isinstance(versions, list) else None
    if not isinstance(error, dict):
        return None
    if error.get("code") == UnsupportedProtocolVersion.code:
        data = error.get("data")
        supported = data.get("supported") if isinstance(data, dict) else None
        return isinstance(supported, list) and any(v in MODERN_VERSIONS for v in supported)
    return False if error.get("code") == MethodNotFound.code else None


def unsupported_version(call: Request) -> UnsupportedProtocolVersion:
    """A 2026-07-28 request for a handshake-only upstream, not bridged (bridging.enabled: false):
    -32022 at once, naming what the proxy serves this tenant (the handshake versions), so the
    client falls back to initialize."""
    return UnsupportedProtocolVersion(
        "Unsupported protocol version: this tenant's MCP server speaks only the initialize "
        "handshake era; use one of data.supported",
        data={"supported": sorted(HANDSHAKE_VERSIONS), "requested": call.protocol_version},
    )
