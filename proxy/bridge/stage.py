"""The bridge in the flows: which exchanges it carries, and the held session each one uses.

    route      POST check (where the era is known): a 2026-07-28 request for a handshake-only
               upstream is bridged (or, with bridging off, refused with -32022 so the client falls
               back); what cannot be bridged is refused; a handshake-era session the proxy keeps
               itself, and every initialize, go through the reverse bridge
    declare    POST check, after the policy: what the bridge keeps of the client's capabilities
               and clientInfo (declared.py; a 2026-07-28 request's _meta, a handshake initialize),
               bounded: more is refused with -32602 before any upstream call
    hold       POST Around, after the cache: a bridged 2026-07-28 request takes the caller's held
               session (its principal and what declare kept) and gives it back when the exchange ends
    session    GET/DELETE check: a session the proxy keeps itself is served by the reverse bridge

Everything else in the flow (audit, limits, policy, cache) runs for a bridged exchange as for any
other: the bridge only stands in for the upstream (`Exchange.bridged`).
"""

from __future__ import annotations

import contextlib
from typing import Final

from aiohttp import web

from proxy.bridge.calls import HandshakeBridge
from proxy.bridge.declared import Declared, declared
from proxy.bridge.held import HeldSession, SessionRefused
from proxy.bridge.shapes import CLIENT_INFO_META, meta_of, reverse_session_state
from proxy.flow import Around, Call, Request
from proxy.layers.data_access.catalog import Listing, SessionRoute
from proxy.protocol.errors import MethodNotFound, ProxyError, TooManyRequests, UpstreamError
from proxy.protocol.headers import CLIENT_CAPABILITIES_META, PARAM_HEADER_PREFIX
from proxy.protocol.jsonrpc import TASK_ID_METHODS, MessageKind
from proxy.types import Era
from proxy.upstreams.base import UpstreamRequest, UpstreamResponse
from proxy.upstreams.eras import unsupported_version

_BRIDGED: Final = "bridge.bridged"  # this 2026-07-28 request goes to a handshake-only upstream
_HELD: Final = "bridge.held"
_DECLARED: Final = "bridge.declared"
_UNDECLARED: Final = Declared({}, None)  # the proxy's own session
_CATALOG_KINDS: Final[dict[str, Listing]] = {"tools/call": "tools", "prompts/get": "prompts"}


async def route(call: Request) -> None:
    """Whether the bridge carries this exchange, and which way."""
    bridge = call.tenant.bridge
    if call.era is Era.HANDSHAKE:
        if bridge.enabled and (call.session is None or _kept_by_proxy(call)):
            call.bridged = bridge.to_modern  # (an initialize: bridged only if the upstream keeps no session)
            if call.session is not None and _catalog_needed(call):
                await _learn_catalog(call, None)
        return
    if await call.tenant.eras.speaks_modern(call.tenant.upstream) is not False:
        return
    if not bridge.enabled:
        raise unsupported_version(call)
    message = call.message
    if message.kind is MessageKind.NOTIFICATION:
        call.reply = web.Response(status=202)  # (2026-07-28 cancels by closing the request's stream)
        return
    if message.method in TASK_ID_METHODS:
        raise MethodNotFound(
            f"Method not found: {message.method} is not bridged to this tenant's MCP server, which speaks "
            "only the initialize handshake era"
        )
    call.slots[_BRIDGED] = True
    if _catalog_needed(call):
        held = await _take(call, None, _UNDECLARED)  # the proxy's own session: the catalog lists on it
        try:
            if held.upstream_session_id is not None:
                await _learn_catalog(call, SessionRoute(held.upstream_session_id, held.protocol_version))
        finally:
            bridge.to_handshake.sessions.give_back(held)


def _kept_by_proxy(call: Call) -> bool:
    session = call.session
    return session is not None and reverse_session_state(session.upstream_session_id) is not None


def _catalog_needed(call: Request) -> bool:
    """Whether the policy (or Mcp-Param-* headers) will ask the catalog about a tool or prompt it
    does not know yet."""
    message = call.message
    kind = _CATALOG_KINDS.get(message.method or "")
    name = message.name
    if kind is None or name is None or call.tenant.catalog.cached(kind, name) is not None:
        return False
    mirrored = any(h.lower().startswith(PARAM_HEADER_PREFIX.lower()) for h in call.request.headers)
    return call.tenant.policy is not None or mirrored


async def _learn_catalog(call: Request, route: SessionRoute | None) -> None:
    """The tool or prompt the request names, learned before the policy needs its schema: the
    catalog would otherwise list a handshake-only upstream in 2026-07-28, or a modern one on a
    session it does not have."""
    kind = _CATALOG_KINDS[call.message.method or ""]
    with contextlib.suppress(ProxyError):  # (the policy stage fails closed itself if it must know)
        await call.tenant.catalog.lookup(kind, call.message.name or "", route)


async def declare(call: Request) -> None:
    """What the bridge will keep of the client's declarations (after the policy filtered them),
    bounded before anything is opened or stored: a bridged 2026-07-28 request's _meta, and a
    handshake initialize the proxy may keep the session of (whether it does is known only from
    the upstream's answer, so every initialize the reverse bridge carries)."""
    message = call.message
    if message.kind is not MessageKind.REQUEST:
        return
    if call.slots.get(_BRIDGED):
        meta = meta_of(message.params)
        call.slots[_DECLARED] = declared(meta.get(CLIENT_CAPABILITIES_META), meta.get(CLIENT_INFO_META))
    elif message.method == "initialize" and call.bridged is call.tenant.bridge.to_modern:
        params = message.params
        declared(params.get("capabilities"), params.get("clientInfo"))


async def _take(call: Request, principal: str | None, kept: Declared) -> HeldSession:
    try:
        return await call.tenant.bridge.to_handshake.sessions.take(principal, kept)
    except TooManyRequests as refused:  # (counted with the tenant's other limits)
        data = refused.data if isinstance(refused.data, dict) else {}
        limit = str(data.get("limit", "bridged_sessions"))
        call.outcome, call.limited = "denied", limit
        call.services.metrics.count_limited(call.ctx.tenant, limit)
        raise
    except UpstreamError as error:  # (the circuit learns of the upstream's failures, not its refusals)
        call.upstream_contacted, call.upstream_fault = True, not isinstance(error, SessionRefused)
        raise


class Hold(Around[Request]):
    """A bridged request takes the caller's held session for the exchange (after the cache: a hit
    opens nothing)."""

    async def enter(self, call: Request) -> bool:
        if not call.slots.get(_BRIDGED) or call.message.kind is not MessageKind.REQUEST:
            return False
        kept: Declared = call.slots[_DECLARED]
        held = await _take(call, call.ctx.principal, kept)
        stand_in = HeldCall(call.tenant.bridge.to_handshake, held)
        call.slots[_HELD] = stand_in
        call.bridged = stand_in
        return True

    def leave(self, call: Request, failure: BaseException | None) -> None:
        stand_in: HeldCall = call.slots.pop(_HELD)
        stand_in.bridge.sessions.give_back(stand_in.held)


hold = Hold()


async def session(call: Call) -> None:
    """GET and DELETE of a session the proxy keeps itself: the reverse bridge answers them."""
    if call.tenant.bridge.enabled and _kept_by_proxy(call):
        call.bridged = call.tenant.bridge.to_modern


class HeldCall:
    """The upstream as one bridged exchange sees it: its caller's held session. An upstream that
    forgot the session (restarted, expired it) gets a new one, once."""

    def __init__(self, bridge: HandshakeBridge, held: HeldSession) -> None:
        self.bridge = bridge
        self.held = held
        self.tenant = bridge.upstream.tenant
        self.identity = bridge.upstream.identity

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        response = await self.bridge.forward(self.held, request)
        if response is None:
            sessions, gone = self.bridge.sessions, self.held
            sessions.forget(gone)
            self.held = await sessions.take(gone.principal, gone.declared)
            sessions.give_back(gone)
            response = await self.bridge.forward(self.held, request)
        if response is None:
            raise UpstreamError(
                "The upstream MCP server did not keep the session the proxy opened for the call"
            )
        return response

    async def sweep(self) -> None:
        """Nothing to tidy: the held sessions are the bridge's."""

    async def close(self) -> None:
        """Nothing to close: the held session goes back when the exchange ends."""
