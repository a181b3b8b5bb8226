"""The upstream sessions the proxy holds for a tenant's 2026-07-28 callers of a handshake-era upstream.

One per caller and set of client capabilities: a session is never shared across subjects (the
caller is TenantContext.principal, issuer and subject) and is initialized with the capabilities the
caller declares in `_meta`, as the policy leaves them and as the bridge keeps them (declared.py:
what changes what the proxy forwards; experimental and unknown members neither reach the upstream
nor make a session of their own). A per_session stdio upstream gives each its own process. A
session nothing used for `bridging.idle_seconds` is ended; all of them end on reload and shutdown.

Caps, so that no caller can take the tenant's sessions from the others:
    per caller   at most `bridging.max_sessions_per_caller` (and fewer than the tenant's cap, when
                 that is more than 1): the caller's own least recently used idle one makes room,
                 else 429; a caller never ends another's session to get one more of its own
    per tenant   at most `bridging.max_sessions_per_tenant`: an idle session makes room, one of
                 the caller holding the most first (the least recently used of those), else 429;
                 a session in use is never ended for another

They live in this process: with several replicas each holds its own (a caller's requests may land
on any replica, each then talks to the upstream on a session of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

import structlog

from proxy.bridge.declared import Declared
from proxy.bridge.shapes import HANDSHAKE_VERSION, PROXY_CLIENT_INFO
from proxy.config import BridgingConfig
from proxy.protocol.errors import ProxyError, TooManyRequests, UpstreamError
from proxy.protocol.jsonrpc import dumps
from proxy.types import HANDSHAKE_VERSIONS, JsonObject
from proxy.upstreams.base import JSON, Upstream, UpstreamRequest, UpstreamResponse, answer_to

log = structlog.get_logger("proxy.bridge")

ACCEPT_BOTH: Final = "application/json, text/event-stream"
END_SECONDS: Final = 5.0  # how long ending one session upstream may take
_ids = itertools.count(1)
Key = tuple[str | None, str]  # (principal, capabilities); principal None: the proxy's own session


class SessionRefused(UpstreamError):
    """No held session for the call, and no failure of the upstream (the circuit does not count it):
    it answered the proxy's initialize without opening one, or a reload retired these sessions."""


@dataclass(eq=False)
class HeldSession:
    principal: str | None
    declared: Declared  # what it was initialized with
    upstream_session_id: str | None  # None: the upstream keeps no sessions (stateless)
    protocol_version: str
    initialize_result: JsonObject
    users: int = 0  # calls in flight on it, and calls waiting for their client's input
    last_used: float = field(default_factory=time.monotonic)
    ended: bool = False

    @property
    def key(self) -> Key:
        return (self.principal, self.declared.key)

    def headers(self, accept: str = ACCEPT_BOTH) -> dict[str, str]:
        headers = {"Content-Type": JSON, "Accept": accept, "MCP-Protocol-Version": self.protocol_version}
        if self.upstream_session_id is not None:
            headers["Mcp-Session-Id"] = self.upstream_session_id
        return headers


async def post(upstream: Upstream, held: HeldSession, message: JsonObject) -> UpstreamResponse:
    """One message on a held session (the caller closes the answer)."""
    return await upstream.send(UpstreamRequest("POST", held.headers(), dumps(message), held.principal))


async def post_and_close(upstream: Upstream, held: HeldSession, message: JsonObject) -> None:
    """A notification or an answer to the server, on a held session; a failure only loses it."""
    with contextlib.suppress(ProxyError):
        (await post(upstream, held, message)).close()


class HeldSessions:
    def __init__(self, tenant: str, upstream: Upstream, config: BridgingConfig) -> None:
        self.tenant = tenant
        self.upstream = upstream
        self.config = config
        # A caller's share: never the whole of the tenant's (unless the tenant may hold only one).
        tenant_cap = config.max_sessions_per_tenant
        self.per_caller = min(config.max_sessions_per_caller, max(1, tenant_cap - 1))
        self._held: dict[Key, HeldSession] = {}
        self._opening: dict[Key, asyncio.Future[None]] = {}
        self._retired = False
        self._reaper: asyncio.Task[None] | None = None
        self._ending: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._held)

    async def take(self, principal: str | None, declared: Declared) -> HeldSession:
        """The caller's session for these declarations, opened now if there is none; the caller
        gives it back (`give_back`) once done with it."""
        key = (principal, declared.key)
        while True:
            if self._retired:
                raise SessionRefused("The tenant's configuration changed while the request was on its way")
            held = self._held.get(key)
            if held is not None:
                held.users += 1
                return held
            opening = self._opening.get(key)
            if opening is None:
                break
            await asyncio.wait({opening})  # (opened, or failed: then this caller tries itself)
        self._make_room(principal)
        opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._opening[key] = opened
        try:
            held = await self._open(principal, declared)
        finally:
            del self._opening[key]
            opened.set_result(None)
        if self._retired:
            self._end_soon(held)
            raise SessionRefused("The tenant's configuration changed while the request was on its way")
        self._held[key] = held
        held.users += 1
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap(), name=f"bridge-reaper-{self.tenant}")
        return held

    def give_back(self, held: HeldSession) -> None:
        held.users -= 1
        held.last_used = time.monotonic()
        if self._retired and held.users == 0:
            self._end_soon(held)

    def forget(self, held: HeldSession) -> None:
        """The upstream no longer knows the session (404): the next caller opens a new one."""
        held.ended = True
        if self._held.get(held.key) is held:
            del self._held[held.key]

    def _make_room(self, principal: str | None) -> None:
        """Room for one more session of `principal`'s, or TooManyRequests."""
        holding = Counter(held.principal for held in self._held.values())
        holding.update(key[0] for key in self._opening)
        if holding[principal] >= self.per_caller:
            own = [h for h in self._held.values() if h.principal == principal and h.users == 0]
            if not own:
                raise TooManyRequests(
                    "Too many requests: the proxy already holds as many sessions with this tenant's MCP "
                    "server for this caller as it holds for one caller, all in use; retry later",
                    data={"limit": "bridged_sessions_per_caller"},
                    headers={"Retry-After": "5"},
                )
            self._end_soon(min(own, key=lambda held: held.last_used))
            holding[principal] -= 1
        if holding.total() < self.config.max_sessions_per_tenant:
            return
        # Max-min fair: an idle session of the caller's own, or of a caller holding more than it does.
        mine = holding[principal]
        idle = [
            held
            for held in self._held.values()
            if held.users == 0 and (held.principal == principal or holding[held.principal] > mine)
        ]
        if not idle:
            raise TooManyRequests(
                "Too many requests: this tenant's MCP server already has as many sessions as the proxy "
                "holds for it, in use or held for callers with no more than this one; retry later",
                data={"limit": "bridged_sessions"},
                headers={"Retry-After": "5"},
            )
        self._end_soon(min(idle, key=lambda held: (-holding[held.principal], held.last_used)))

    async def _open(self, principal: str | None, declared: Declared) -> HeldSession:
        request_id = f"mcp-tenant-proxy-bridge-initialize-{next(_ids)}"
        params = {
            "protocolVersion": HANDSHAKE_VERSION,
            "capabilities": declared.capabilities,
            "clientInfo": declared.client_info or PROXY_CLIENT_INFO,
        }
        body = {"jsonrpc": "2.0", "id": request_id, "method": "initialize", "params": params}
        headers = {"Content-Type": JSON, "Accept": ACCEPT_BOTH}
        response = await self.upstream.send(UpstreamRequest("POST", headers, dumps(body), principal))
        try:
            answer = await answer_to(response, request_id) if response.status == 200 else None
        finally:
            response.close()
        result = answer.get("result") if answer is not None else None
        version = result.get("protocolVersion") if isinstance(result, dict) else None
        held = HeldSession(principal, declared, response.session_id, str(version), result or {})
        if not isinstance(result, dict) or version not in HANDSHAKE_VERSIONS:
            self._end_soon(held)
            failed = UpstreamError if response.status >= 500 else SessionRefused
            raise failed("The upstream MCP server did not open a session for the proxy")
        await post_and_close(self.upstream, held, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        log.info("bridge_session_opened", tenant=self.tenant, held=len(self._held) + 1)
        return held

    def _end_soon(self, held: HeldSession) -> None:
        self.forget(held)
        task = asyncio.create_task(self._end(held))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def _end(self, held: HeldSession) -> None:
        if held.upstream_session_id is None:
            return
        headers = {"Mcp-Session-Id": held.upstream_session_id, "MCP-Protocol-Version": held.protocol_version}
        with contextlib.suppress(ProxyError, TimeoutError):
            async with asyncio.timeout(END_SECONDS):
                (await self.upstream.send(UpstreamRequest("DELETE", headers, None, held.principal))).close()

    async def _reap(self) -> None:
        """End sessions idle for bridging.idle_seconds, while there are any."""
        idle_seconds = self.config.idle_seconds
        while self._held:
            await asyncio.sleep(max(0.2, idle_seconds / 4))
            now = time.monotonic()
            for held in [h for h in self._held.values() if h.users == 0 and now - h.last_used > idle_seconds]:
                log.info("bridge_session_idle", tenant=self.tenant)
                self._end_soon(held)
        self._reaper = None

    def retire(self) -> None:
        """A reload replaced the config: idle sessions end now, busy ones once their calls are done."""
        self._retired = True
        for held in [h for h in self._held.values() if h.users == 0]:
            self._end_soon(held)

    async def close(self) -> None:
        """Shutdown: every session ends upstream (a stdio one with its process)."""
        self._retired = True
        if self._reaper is not None:
            self._reaper.cancel()
        for held in list(self._held.values()):
            self._end_soon(held)
        if self._ending:
            await asyncio.gather(*self._ending, return_exceptions=True)
