"""The sessions layer in the flow (handshake era): every request after initialize must name a
session of its own caller; initialize holds a place under the tenant's cap until the upstream has
answered; a session answering a request is never idle.

    bind            Around: the caller's own session (404 exactly as for an unknown id), or for
                    initialize a reservation given back unless it became a session (open_session)
    track           response hook: answers settle the session's bookkeeping, server-to-client
                    requests are remembered so that only this session can answer them (the shared
                    store's write is awaited by the relay, `settled`, before the request leaves),
                    and the upstream is told when no answer came in sessions.answer_timeout_seconds
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable

import structlog

from proxy.flow import Around, Call, Request, ServerKind, ServerMessage
from proxy.http.edge import single_header
from proxy.layers.sessions.backend import SessionStore
from proxy.layers.sessions.registry import Session
from proxy.protocol.errors import BadRequest, MethodNotAllowed, MissingSession, ProxyError, UpstreamError
from proxy.protocol.headers import PROTOCOL_VERSION_HEADER
from proxy.protocol.jsonrpc import MessageKind, dumps
from proxy.types import HANDSHAKE_VERSIONS, Era, JsonObject, RequestId
from proxy.upstreams.base import Upstream, UpstreamRequest

log = structlog.get_logger("proxy.sessions")

SESSION_HEADER = "Mcp-Session-Id"
_RESERVATION = "sessions.reservation"  # an initialize's place under the tenant's cap
_BUSY = "sessions.busy"  # the session this exchange keeps from idling
_WRITES = "sessions.writes"  # shared-store writes a message about to leave depends on
ANSWER_TIMEOUT_CODE = -32001  # what the SDKs call a request timeout


class Bind(Around[Call]):
    """Handshake era: the session must be the caller's own (404 exactly as for an unknown id); an
    initialize holds a place under the tenant's cap until the upstream has answered it; a session
    answering a request is never idle. 2026-07-28 requests have no session and pass."""

    async def enter(self, call: Call) -> bool:
        post = call.request.method == "POST"
        if post and call.era is not Era.HANDSHAKE:
            return False
        if not post:
            session_id = single_header(call, SESSION_HEADER)
            if session_id is None:
                version = call.request.headers.get(PROTOCOL_VERSION_HEADER)
                if version in HANDSHAKE_VERSIONS:
                    raise MissingSession()
                raise MethodNotAllowed(
                    "Method not allowed: without a session only POST is served", headers={"Allow": "POST"}
                )
            call.era = Era.HANDSHAKE
        else:
            session_id = call.request.headers.get(SESSION_HEADER)
        registry = call.services.sessions
        if session_id is None:  # initialize: a place under the cap, until the upstream has answered
            call.slots[_RESERVATION] = await registry.reserve(call.ctx)
            return True
        session = await registry.lookup(session_id, call.ctx)
        message = call.message
        if message is not None and message.method == "initialize":
            # Never forwarded: it would re-initialize the upstream session (a shared stdio child's too).
            raise BadRequest(
                "Invalid request: initialize starts a new session; send it without Mcp-Session-Id"
            )
        call.session = session
        if call.protocol_version is None:
            call.protocol_version = session.protocol_version
        if message is not None and message.kind is MessageKind.RESPONSE:
            assert message.id is not None
            if not await registry.take_answer(session, message.id):
                raise BadRequest("Invalid request: this session has no pending server request with that id")
        if not post:
            return False
        session.busy += 1
        call.slots[_BUSY] = session
        if message is not None and message.kind is MessageKind.REQUEST:
            session.forward(message)
        elif message is not None and message.method == "notifications/cancelled":
            session.cancel(message.params.get("requestId"))  # its end is not the upstream failing
        return True

    def leave(self, call: Call, failure: BaseException | None) -> None:
        reservation = call.slots.pop(_RESERVATION, None)
        if reservation is not None:  # an initialize that no session came of
            call.services.sessions.release(call.ctx.tenant, reservation)
        session: Session | None = call.slots.pop(_BUSY, None)
        if session is None:
            return
        session.busy -= 1
        session.last_seen = time.monotonic()
        message = call.message
        # A client that went away, or whose stream the upstream closed to be resumed (SEP-1699), may
        # still get the answer on a GET stream, delivered as this request's: the request stays known.
        abandoned = isinstance(failure, asyncio.CancelledError) and call.upstream_contacted
        if message is not None and message.kind is MessageKind.REQUEST:
            session.cancelled.discard(message.id)  # (the relay has judged how it ended)
            if not (abandoned or call.awaiting_resumption):
                session.answered(message.id)


bind = Bind()


async def open_session(call: Request, upstream_session_id: str | None, version: str) -> Session:
    """The session an initialize answered by the upstream becomes (its reservation is used up). It
    keeps the version the server chose, one the proxy speaks: never a string the client chose."""
    session = await call.services.sessions.create(
        call.ctx, version, upstream_session_id, call.slots[_RESERVATION]
    )
    del call.slots[_RESERVATION]
    call.session = session
    return session


def track(call: Call, message: ServerMessage) -> ServerMessage | None:
    """What the session must know of a message coming back: an answered request is forgotten, the
    protocol version the server chose is kept, a server-to-client request may be answered later
    (by this session only); none reaches a client outside a handshake session."""
    session = call.session
    if message.kind is ServerKind.SERVER_REQUEST:
        if call.era is not Era.HANDSHAKE or session is None:
            return None  # the modern era has no back channel; never deliver one elsewhere
        store, request_id = call.services.sessions, message.body["id"]
        write = store.expect_answer(session, request_id)
        if write is not None:
            call.slots.setdefault(_WRITES, []).append(write)
        _answer_deadline(call.upstream, store, session, request_id)
        return message
    if message.kind is ServerKind.ANSWER and session is not None and message.answers is not None:
        session.answered(message.answers.id)
        result = message.body.get("result")
        if message.answers.method == "initialize" and isinstance(result, dict):
            version = result.get("protocolVersion")
            if isinstance(version, str):  # the session speaks what the server chose
                session.protocol_version = version
    return message


async def settled(call: Call) -> None:
    """Wait for the shared-store writes the messages about to leave depend on (a server request's
    answer must find it pending on whichever replica it reaches)."""
    writes: list[Awaitable[None]] | None = call.slots.pop(_WRITES, None)
    for write in writes or ():
        await write


def _answer_deadline(
    upstream: Upstream, store: SessionStore, session: Session, request_id: RequestId
) -> None:
    """After sessions.answer_timeout_seconds, an answer still owed is given up: the upstream gets an
    error instead of waiting for ever (the client went away, or never answers)."""

    async def give_up() -> None:
        if session.closed or not await store.give_up_answer(session, request_id):
            return
        log.info("server_request_unanswered", tenant=session.tenant, session=session.audit_id)
        waited = f"{store.answer_timeout_seconds:g}"
        message = f"Request timed out: the client did not answer within {waited} s"
        error = {"code": ANSWER_TIMEOUT_CODE, "message": message}
        await _send_on_session(upstream, session, {"jsonrpc": "2.0", "id": request_id, "error": error})

    loop = asyncio.get_running_loop()
    loop.call_later(store.answer_timeout_seconds, lambda: _spawn(give_up()))


async def end_upstream_session(upstream: Upstream, session: Session) -> int:
    """DELETE the upstream side of a session; returns the upstream's status (0 when unreachable)."""
    if session.upstream_session_id is None:
        return 200
    headers = {SESSION_HEADER: session.upstream_session_id, "MCP-Protocol-Version": session.protocol_version}
    try:
        response = await upstream.send(UpstreamRequest("DELETE", headers))
    except UpstreamError:
        return 0
    response.close()
    return response.status


_SENT_SOON: set[asyncio.Task[None]] = set()


def send_on_session_soon(call: Call, message: JsonObject) -> None:
    """Send a message of the proxy's own to the upstream on the call's session (an answer to a
    server-to-client request the policy answers or refuses), without the exchange waiting for it."""
    if call.session is not None:
        _spawn(_send_on_session(call.upstream, call.session, message))


async def _send_on_session(upstream: Upstream, session: Session, message: JsonObject) -> None:
    if session.upstream_session_id is None:
        return
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        SESSION_HEADER: session.upstream_session_id,
        "MCP-Protocol-Version": session.protocol_version,
    }
    with contextlib.suppress(ProxyError):
        (await upstream.send(UpstreamRequest("POST", headers, dumps(message)))).close()


def _spawn(work: Awaitable[None]) -> None:
    task = asyncio.ensure_future(work)
    _SENT_SOON.add(task)
    task.add_done_callback(_SENT_SOON.discard)
