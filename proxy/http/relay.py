"""The one relay: an upstream's answer, message by message, through the response hooks to the client.

    forward_post     a POST to the tenant's upstream, answered as JSON, as an SSE stream relayed as
                     it arrives (never buffered), or (initialize) once the session exists
    relay_get        a session's GET stream, resumable with the proxy's own event ids
    forward_delete   a session ended on both sides

Every upstream message becomes a ServerMessage (the answer to this request, a notification, or a
server-to-client request) and passes the flow's response hooks, which may change or drop it. The
relay also tells the limits layer whether the upstream itself failed (`Call.upstream_fault`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import structlog
from aiohttp import web

from proxy.flow import Call, Hooks, Reply, Request, ServerKind, ServerMessage, deliver
from proxy.http.edge import NO_STORE, single_header
from proxy.http.keys import RUNTIME
from proxy.layers.data_access.stage import hidden_from
from proxy.layers.sessions.registry import PostStream, Session
from proxy.layers.sessions.stage import SESSION_HEADER, end_upstream_session, open_session, settled
from proxy.protocol.errors import (
    Conflict,
    Forbidden,
    MethodNotAllowed,
    ProxyError,
    SessionNotFound,
    TooManyRequests,
    UpstreamError,
    sanitize_error,
    upstream_asked_to_wait,
)
from proxy.protocol.jsonrpc import Message, MessageKind, dumps
from proxy.protocol.sse import KEEPALIVE_BYTES, encode_event
from proxy.types import HANDSHAKE_VERSIONS, JsonObject, RequestId
from proxy.upstreams.base import (
    EVENT_STREAM,
    JSON,
    Incoming,
    UpstreamRequest,
    UpstreamResponse,
    answer_to,
    incoming,
    parse_upstream,
    same_id,
)

log = structlog.get_logger("proxy.relay")
T = TypeVar("T")
SSE_HEADERS = {
    "Content-Type": EVENT_STREAM,
    "Cache-Control": "no-store, no-transform",
    "X-Accel-Buffering": "no",
}
ACCEPT_BOTH = "application/json, text/event-stream"
DRAIN_SECONDS = 0.25


# --- what each upstream message is, and what the client may see of it -----------------------------


def classify(call: Call, body: JsonObject, answered: Message | None = None) -> ServerMessage | None:
    """The message as the hooks see it; None for what answers nothing this call asked."""
    method = body.get("method")
    if "method" not in body:
        request = answered or call.message
        if (
            request is not None
            and request.kind is MessageKind.REQUEST
            and same_id(body.get("id"), request.id)
        ):
            return ServerMessage(ServerKind.ANSWER, body, request)
        log.warning(
            "upstream_message_dropped", reason="response to an unknown request id", tenant=call.ctx.tenant
        )
        return None
    if not isinstance(method, str):
        return None
    return ServerMessage(ServerKind.SERVER_REQUEST if "id" in body else ServerKind.NOTIFICATION, body)


def sanitize_answer(call: Call, message: ServerMessage) -> ServerMessage | None:
    """An error answer keeps its code and a bounded, printable message; never upstream internals."""
    if message.kind is not ServerKind.ANSWER or message.answers is None:
        return message
    if "error" in message.body or not isinstance(message.body.get("result"), dict):
        error = sanitize_error(message.body.get("error"), hidden_from(call))
        call.outcome = "error"
        call.error_code = error["code"]
        message.body = {"jsonrpc": "2.0", "id": message.answers.id, "error": error}
    return message


def _out(call: Call, message: ServerMessage, hooks: Hooks) -> bytes | None:
    """A message after every hook, serialised; an answer's result is what the audit records."""
    if deliver(call, message, hooks) is None:
        return None
    if message.kind is ServerKind.ANSWER:
        raw = message.result_bytes()
        if raw is not None:
            call.record_result(raw)
    return message.to_bytes()


def _waited(call: Call) -> Callable[[float], None]:
    def add(seconds: float) -> None:
        call.upstream_seconds += seconds

    return add


def _upstream_headers(call: Call, accept: str) -> dict[str, str]:
    headers = {"Accept": accept, **call.upstream_headers}
    session = call.session
    if session is not None and session.upstream_session_id is not None:
        headers[SESSION_HEADER] = session.upstream_session_id
    return headers


# --- POST ------------------------------------------------------------------------------------------


async def forward_post(call: Request, hooks: Hooks) -> Reply:
    """Send the request upstream and relay what comes back; the upstream's own faults are noted."""
    headers = _upstream_headers(call, ACCEPT_BOTH)
    headers["Content-Type"] = JSON
    call.upstream_contacted = True
    call.services.reports.while_waiting()
    started = time.perf_counter()
    try:
        request = UpstreamRequest("POST", headers, dumps(call.message.body), call.ctx.principal)
        response = await call.upstream.send(request)
    except UpstreamError as error:
        call.upstream_fault, call.error_code = True, error.code
        raise
    except TooManyRequests:  # the upstream refused to start another process for the tenant
        call.services.metrics.count_limited(call.ctx.tenant, "processes")
        call.outcome = "denied"
        raise
    finally:
        call.upstream_seconds += time.perf_counter() - started
    call.upstream_status = response.status
    for listener in call.on_upstream_status:
        listener(response.status)
    try:
        reply = await _relay_post(call, response, hooks)
    except UpstreamError as error:
        if call.upstream_fault is None:
            call.upstream_fault, call.error_code = True, error.code
        raise
    except ProxyError:
        if call.upstream_fault is None:
            call.upstream_fault = False  # (the upstream did answer: e.g. it forgot the session)
        raise
    finally:
        response.close()
        # The client cancelled it and got no result: however it ended (no answer, an error), the
        # client ended it. (A result that crossed the cancel was answered all the same.)
        cancelled = call.result_sha256 is None and _cancelled_by_client(call)
        if cancelled:
            call.outcome, call.upstream_fault = "cancelled", None
    if call.upstream_fault is None and not cancelled:
        call.upstream_fault = response.status >= 500
    return reply


def _cancelled_by_client(call: Request) -> bool:
    """Handshake era: the client cancelled this request (notifications/cancelled on its session)."""
    session = call.session
    return session is not None and session.cancelled_by_client(call.message.id)


async def _relay_post(call: Request, response: UpstreamResponse, hooks: Hooks) -> Reply:
    message = call.message
    wait = upstream_asked_to_wait(response.status, response.retry_after)
    if wait is not None:  # a 429 is no upstream fault; a 503 is, as without the hint
        call.upstream_fault = response.status >= 500
        raise wait
    if message.kind is not MessageKind.REQUEST:
        if response.status < 300:
            return web.Response(status=202)
    elif response.status == 404 and call.session is not None:
        await call.services.sessions.remove(call.session)  # the upstream forgot it: so do we
        raise SessionNotFound()
    elif message.method == "initialize" and response.status == 200:
        return await _relay_initialize(call, response, hooks)
    if response.content_type == EVENT_STREAM and response.status == 200:
        return await _relay_post_stream(call, response, hooks)
    if response.content_type == JSON:
        return await _relay_json(call, response, hooks)
    call.upstream_fault = response.status >= 500  # a non-MCP answer: only a 5xx is the upstream failing
    raise UpstreamError(f"The upstream MCP server answered with HTTP {response.status}")


async def _relay_json(call: Request, response: UpstreamResponse, hooks: Hooks) -> Reply:
    started = time.perf_counter()
    try:
        raw = await response.read_json()
    finally:
        call.upstream_seconds += time.perf_counter() - started
    body = parse_upstream(raw)
    if response.status >= 400:
        if not isinstance(body.get("error"), dict):
            call.upstream_fault = response.status >= 500
            raise UpstreamError(f"The upstream MCP server answered with HTTP {response.status}")
        error = sanitize_error(body.get("error"), hidden_from(call))
        call.outcome, call.error_code = "error", error["code"]
        reply = {"jsonrpc": "2.0", "id": call.message.id, "error": error}
        return web.Response(status=response.status, body=dumps(reply), content_type=JSON, headers=NO_STORE)
    answer = classify(call, body)
    if answer is None or answer.kind is not ServerKind.ANSWER:
        raise UpstreamError("The upstream MCP server answered a different request id")
    out = _out(call, answer, hooks)
    assert out is not None  # an answer is always delivered
    return web.Response(body=out, content_type=JSON, headers=NO_STORE)


async def _relay_post_stream(call: Request, response: UpstreamResponse, hooks: Hooks) -> Reply:
    stream = call.stream = web.StreamResponse(status=200, headers=SSE_HEADERS)
    await stream.prepare(call.request)
    answered = False
    primed = False  # an event id went out: the client can resume the stream (handshake era)
    events = incoming(response, _waited(call))
    removed = call.tenant.removed
    try:
        async for batch in _until(events, removed):
            out: list[bytes] = []  # what arrived together goes out in one write
            try:
                for item in batch:
                    if removed.is_set():
                        break
                    primed = primed or (bool(item.event_id) and call.session is not None)
                    answered = _relay_item(call, item, hooks, out) or answered
                    if answered:
                        break
            except ProxyError:  # what was good before a bad event still goes out, and first
                if out:
                    await settled(call)
                    await stream.write(b"".join(out))
                raise
            if out:
                await settled(call)
                await stream.write(b"".join(out))
            if answered:
                break
    except ProxyError as error:
        if not answered:
            call.outcome, call.error_code = "error", error.code
            call.upstream_fault = isinstance(error, UpstreamError)
            await stream.write(encode_event(dumps(error.to_jsonrpc(call.message.id))))
            answered = True
    if not answered and removed.is_set():
        # A reload removed the tenant (the answer a new request would get), or gave it another
        # upstream (the request is to be sent again, to that one): the stream ends now.
        gone: ProxyError = Forbidden("Forbidden: this tenant is no longer served")
        if call.tenant.moved:
            gone = UpstreamError("The tenant's MCP server was replaced by a reload; send the request again")
            call.upstream_fault = False
        call.outcome, call.error_code = "error", gone.code
        await stream.write(encode_event(dumps(gone.to_jsonrpc(call.message.id))))
    elif not answered and primed:
        # The upstream closed a resumable stream before answering (SEP-1699 polling): so does the
        # proxy, and the client resumes it with GET + Last-Event-ID (relay_get), where the rest of
        # it, the answer included, comes through the same hooks.
        call.awaiting_resumption, call.upstream_fault = True, False
    elif not answered and not _cancelled_by_client(call):  # (a cancelled request gets no answer)
        call.outcome, call.error_code = "error", UpstreamError.code
        call.upstream_fault = True
        lost = UpstreamError("The upstream MCP server ended the stream without answering")
        await stream.write(encode_event(dumps(lost.to_jsonrpc(call.message.id))))
    await stream.write_eof()
    call.delivered = True
    if not removed.is_set():  # (a removed tenant's stream is dropped, not read on)
        await _drain(events)
    return stream


def _relay_item(call: Call, item: Incoming, hooks: Hooks, out: list[bytes]) -> bool:
    """One upstream event onto the client's stream; True when it was this call's answer."""
    if item.keepalive:
        out.append(KEEPALIVE_BYTES)
        return False
    session = call.session
    event_id = session.issue_event_id(item.event_id, call.message) if session is not None else None
    if item.message is None:  # an id or a retry only (a priming event): relayed under the proxy's id
        if event_id is not None:
            out.append(encode_event("", event_id, item.retry))
        return False
    message = classify(call, item.message)
    if message is None:
        return False
    delivered = _out(call, message, hooks)
    if delivered is not None:
        out.append(encode_event(delivered, event_id, item.retry))
        if message.kind is ServerKind.ANSWER and session is not None and event_id is not None:
            _answered_at(session, message.answers.id if message.answers is not None else None, event_id)
        return message.kind is ServerKind.ANSWER
    return False


def _answered_at(session: Session, request_id: RequestId | None, event_id: str) -> None:
    """The event that carried a POST stream's answer: resuming after it replays nothing more."""
    stream = session.post_streams.get(request_id) if request_id is not None else None
    if stream is not None:
        stream.answered_at = int(event_id)


async def _drain(events: AsyncIterator[object]) -> None:
    """Read an answered stream to its end (it ends right after the answer), so its connection goes
    back to the pool instead of being closed; a stream that lingers is simply dropped."""
    with contextlib.suppress(TimeoutError, ProxyError):
        async with asyncio.timeout(DRAIN_SECONDS):
            async for _ in events:
                pass


async def _relay_initialize(call: Request, response: UpstreamResponse, hooks: Hooks) -> Reply:
    """A session exists only once the upstream has answered initialize successfully.

    The answer is read in full first (it comes at once) so that the Mcp-Session-Id header is only
    ever sent with a result; a failed handshake leaves no session on either side.
    """
    try:
        body = await answer_to(response, call.message.id)
    except ProxyError:
        await _abandon_upstream_session(call, response)
        raise
    if body is None:
        await _abandon_upstream_session(call, response)
        raise UpstreamError("The upstream MCP server did not answer initialize")
    answer = ServerMessage(ServerKind.ANSWER, body, call.message)
    if not isinstance(body.get("result"), dict):
        await _abandon_upstream_session(call, response)
        out = _out(call, answer, hooks)
        assert out is not None
        return web.Response(body=out, content_type=JSON, headers=NO_STORE)
    chosen = body["result"].get("protocolVersion")
    if chosen not in HANDSHAKE_VERSIONS:  # what the session will speak must be a version the proxy speaks
        await _abandon_upstream_session(call, response)
        raise UpstreamError("The upstream MCP server chose a protocol version the proxy does not speak")
    try:
        session = await open_session(call, response.session_id, chosen)
    except ProxyError:  # the shared session store failed: no session, so no upstream one either
        await _abandon_upstream_session(call, response)
        raise
    now = call.request.app[RUNTIME].current.tenants.built(call.tenant.key)
    if now is None or now.upstream is not call.tenant.upstream:
        # A reload moved (or removed) the tenant while this initialize was on its way: the session
        # would hold the old upstream's session id. End both sides; the client initializes again.
        await call.services.sessions.remove(session)
        call.session = None
        await _abandon_upstream_session(call, response)
        raise UpstreamError("The tenant's upstream changed while the session was created; initialize again")
    out = _out(call, answer, hooks)  # settles the version the server chose
    assert out is not None
    return web.Response(body=out, content_type=JSON, headers={**NO_STORE, SESSION_HEADER: session.id})


async def _abandon_upstream_session(call: Call, response: UpstreamResponse) -> None:
    if response.session_id is None:
        return
    headers = {SESSION_HEADER: response.session_id}
    with contextlib.suppress(ProxyError):
        (await call.upstream.send(UpstreamRequest("DELETE", headers))).close()


# --- GET: the session's own stream -----------------------------------------------------------------


async def relay_get(call: Call, hooks: Hooks) -> Reply:
    """Handshake era: the session's own server-to-client stream, resumable with proxy event ids; or,
    when Last-Event-ID names an event of one of the session's POST streams, that stream resumed."""
    session = call.session
    assert session is not None  # (sessions.bind binds one for every GET or refuses it)
    last_event_id = single_header(call, "Last-Event-ID")
    upstream_id = session.upstream_event_id(last_event_id) if last_event_id is not None else None
    resumed = session.post_stream_of(last_event_id) if last_event_id is not None else None
    if last_event_id is not None and upstream_id is not None and resumed is not None:
        return await _resume_post_stream(call, hooks, resumed, int(last_event_id), upstream_id)
    if session.get_stream_open:
        raise Conflict("Conflict: this session already has an open GET stream")
    headers = _upstream_headers(call, EVENT_STREAM)
    headers["MCP-Protocol-Version"] = session.protocol_version
    if upstream_id is not None:  # an id this session never issued replays nothing
        headers["Last-Event-ID"] = upstream_id
    session.get_stream_open = True
    if session.ended is None:
        session.ended = asyncio.Event()
    try:
        return await _upstream_get(call, headers, hooks, None)
    finally:
        session.get_stream_open = False


async def _resume_post_stream(
    call: Call, hooks: Hooks, resumed: PostStream, after: int, upstream_id: str
) -> Reply:
    """SEP-1699: a POST stream the upstream closed before answering (or the client lost), its events
    relayed under the proxy's ids (the priming event and retry included); the client's GET with
    Last-Event-ID resumes it upstream from the matching event, and the rest comes through the hooks
    as that request's, up to its answer."""
    session = call.session
    assert session is not None
    if resumed.answered_at is not None and after >= resumed.answered_at:
        # Nothing comes after the answer (the TypeScript SDK resumes even then, after an error).
        raise MethodNotAllowed(
            "Method not allowed: that stream has ended with its answer",
            headers={"Allow": "GET, POST, DELETE"},
        )
    headers = _upstream_headers(call, EVENT_STREAM)
    headers["MCP-Protocol-Version"] = session.protocol_version
    headers["Last-Event-ID"] = upstream_id
    if session.ended is None:
        session.ended = asyncio.Event()
    session.busy += 1  # a session waiting for an answer is never idle
    try:
        return await _upstream_get(call, headers, hooks, resumed)
    finally:
        session.busy -= 1
        session.last_seen = time.monotonic()


async def _upstream_get(
    call: Call, headers: dict[str, str], hooks: Hooks, resumed: PostStream | None
) -> Reply:
    """The session's GET upstream (its own stream, or a POST stream resumed), relayed to the client."""
    response = await call.upstream.send(UpstreamRequest("GET", headers))
    try:
        await _check_get_answer(call, response)
        return await _relay_get_stream(call, response, hooks, resumed)
    finally:
        response.close()


async def _check_get_answer(call: Call, response: UpstreamResponse) -> None:
    wait = upstream_asked_to_wait(response.status, response.retry_after)
    if wait is not None:
        raise wait
    if response.status == 404:
        assert call.session is not None
        await call.services.sessions.remove(call.session)
        raise SessionNotFound()
    if response.status != 200 or response.content_type != EVENT_STREAM:
        if response.status == 405:
            raise MethodNotAllowed("Method not allowed: the upstream MCP server offers no GET stream")
        if response.status == 409:
            raise Conflict("Conflict: this session already has an open GET stream")
        raise UpstreamError(f"The upstream MCP server answered the GET stream with HTTP {response.status}")


async def _relay_get_stream(
    call: Call, response: UpstreamResponse, hooks: Hooks, resumed: PostStream | None
) -> Reply:
    """A GET stream to its end (the session's stream), or until the answer of `resumed` (a POST
    stream resumed), or the session's end or the proxy's shutdown."""
    session = call.session
    assert session is not None and session.ended is not None
    stream = call.stream = web.StreamResponse(status=200, headers=SSE_HEADERS)
    await stream.prepare(call.request)
    try:
        removed = call.tenant.removed  # (a reload removing the tenant ends the session a little later)
        async for batch in _until(incoming(response), call.services.shutting_down, session.ended, removed):
            out: list[bytes] = []
            answered = False
            for item in batch:
                if removed.is_set():
                    break
                answered = _relay_get_item(call, item, hooks, out, resumed)
                if answered:
                    break
            if out:
                await settled(call)
                await stream.write(b"".join(out))
            if answered:
                break
    except ProxyError as error:
        log.info("upstream_stream_ended", tenant=call.ctx.tenant, reason=error.message)
    await stream.write_eof()
    return stream


def _relay_get_item(
    call: Call, item: Incoming, hooks: Hooks, out: list[bytes], resumed: PostStream | None
) -> bool:
    """An item of a GET stream. An answer to a request of this session whose own stream was lost
    is delivered as that request's answer, and what a resumed POST stream carries is its request's;
    True when the item answers the resumed stream's request."""
    if item.keepalive:
        out.append(KEEPALIVE_BYTES)
        return False
    session = call.session
    assert session is not None
    event_id = session.issue_event_id(item.event_id, resumed.request if resumed is not None else None)
    delivered: bytes | None = None
    answered = False
    body = item.message
    if body is not None:
        answer_id = body.get("id") if "method" not in body else None
        request = session.forwarded.get(answer_id) if isinstance(answer_id, str | int) else None
        if request is None and resumed is not None:
            request = resumed.request
        if request is not None:  # judged as that request's call would be
            on_behalf = dataclasses.replace(call, message=request)
            message = classify(on_behalf, body, request)
            delivered = _out(on_behalf, message, hooks) if message is not None else None
            answered = (
                message is not None and message.kind is ServerKind.ANSWER and resumed is not None
                and same_id(request.id, resumed.request.id)
            )  # fmt: skip
            if answered and event_id is not None:
                _answered_at(session, request.id, event_id)
        else:
            message = classify(call, body)
            delivered = _out(call, message, hooks) if message is not None else None
    if delivered is not None or event_id is not None:
        out.append(encode_event(delivered or b"", event_id, item.retry))
    return answered


async def _until(events: AsyncIterator[T], *stops: asyncio.Event) -> AsyncIterator[T]:
    """The items of `events` until one of `stops` is set (shutdown, the session's end): then the
    stream ends cleanly."""
    iterator = events.__aiter__()
    waits = [asyncio.ensure_future(stop.wait()) for stop in stops]
    step: asyncio.Future[T] | None = None
    try:
        while True:
            step = asyncio.ensure_future(iterator.__anext__())
            await asyncio.wait({step, *waits}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                return  # stopped: the finally below cancels the pending read
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            step = None
            yield item
    finally:
        for wait in waits:
            wait.cancel()
        if step is not None and not step.done():
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, ProxyError):
                await step


# --- DELETE --------------------------------------------------------------------------------------


async def forward_delete(call: Call, hooks: Hooks) -> Reply:
    session = call.session
    assert session is not None  # (sessions.bind binds one for every DELETE or refuses it)
    status = await end_upstream_session(call.upstream, session)
    if status == 405:
        raise MethodNotAllowed(
            "Method not allowed: the upstream MCP server does not let clients end sessions"
        )
    await call.services.sessions.remove(session)
    return web.Response(status=200)
