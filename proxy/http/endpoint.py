"""The MCP endpoint: POST, GET and DELETE, both protocol eras, JSON and SSE relayed as they arrive.

Each handler runs its stage list (pipeline.py), then forwards to the tenant's upstream and relays
the answer message by message through the response hooks. An SSE answer is streamed, never
buffered; when the client goes away the handler is cancelled and the upstream stream is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from typing import TypeVar

import structlog
from aiohttp import web

from proxy.http.pipeline import (
    DELETE_STAGES,
    GET_STAGES,
    NO_STORE,
    POST_STAGES,
    SESSION_HEADER,
    Stage,
    run_stages,
    single_header,
)
from proxy.http.responses import ServerMessages, finish, sanitize_reply
from proxy.layers.sessions.registry import Session
from proxy.protocol.errors import (
    Conflict,
    MethodNotAllowed,
    ProxyError,
    SessionNotFound,
    UpstreamError,
    UpstreamTimeout,
)
from proxy.protocol.jsonrpc import Kind, dumps, loads_upstream
from proxy.protocol.sse import KEEPALIVE_BYTES, Comment, Event, encode_event
from proxy.runtime import RuntimeRef, Services
from proxy.types import DEFAULT_HANDSHAKE_VERSION, Exchange, JsonObject
from proxy.upstreams.http import EVENT_STREAM, JSON, Upstream, UpstreamRequest, UpstreamResponse

log = structlog.get_logger("proxy.http.endpoint")
T = TypeVar("T")

RUNTIME = web.AppKey("runtime", RuntimeRef)
SERVICES = web.AppKey("services", Services)
SSE_HEADERS = {
    "Content-Type": EVENT_STREAM,
    "Cache-Control": "no-store, no-transform",
    "X-Accel-Buffering": "no",
}
ACCEPT_BOTH = "application/json, text/event-stream"
DRAIN_SECONDS = 0.25


def error_reply(exchange: Exchange, error: ProxyError) -> web.Response:
    if exchange.outcome == "ok":
        exchange.outcome = "denied" if error.status in (401, 403) else "error"
    exchange.error_code = error.code
    exchange.status = error.status
    response = web.Response(
        status=error.status,
        body=dumps(error.to_jsonrpc(exchange.request_id)),
        content_type=JSON,
        headers={**NO_STORE, **error.headers},
    )
    if error.status in (408, 413):  # the rest of the body is unread: close rather than drain it
        response.force_close()
    return response


async def _handle(request: web.Request, stages: Sequence[Stage]) -> web.StreamResponse:
    exchange = Exchange(request, request.app[RUNTIME].current, request.app[SERVICES])
    try:
        await run_stages(exchange, stages)
        if exchange.reply is None:
            if request.method == "POST":
                exchange.reply = await forward_post(exchange)
            elif request.method == "GET":
                exchange.reply = await relay_get(exchange)
            else:
                exchange.reply = await forward_delete(exchange)
        return exchange.reply
    except ProxyError as error:
        if exchange.reply is not None and exchange.reply.prepared:
            raise  # the status line is gone; the relay already told the client what it could
        return error_reply(exchange, error)
    finally:
        finish(exchange)


async def handle_mcp(request: web.Request) -> web.StreamResponse:
    if request.method == "POST":
        return await _handle(request, POST_STAGES)
    if request.method == "GET":
        return await _handle(request, GET_STAGES)
    if request.method == "DELETE":
        return await _handle(request, DELETE_STAGES)
    exchange = Exchange(request, request.app[RUNTIME].current, request.app[SERVICES])
    return error_reply(exchange, MethodNotAllowed(headers={"Allow": "GET, POST, DELETE"}))


def _upstream_headers(exchange: Exchange, accept: str) -> dict[str, str]:
    headers = {"Accept": accept, **exchange.upstream_headers}
    session = exchange.session
    if session is not None and session.upstream_session_id is not None:
        headers[SESSION_HEADER] = session.upstream_session_id
    return headers


def _parse_upstream(raw: bytes | str) -> JsonObject:
    try:
        message = loads_upstream(raw)
    except ProxyError:
        raise UpstreamError("The upstream MCP server sent a malformed message") from None
    if not isinstance(message, dict):
        raise UpstreamError("The upstream MCP server sent a malformed message")
    return message


async def forward_post(exchange: Exchange) -> web.StreamResponse:
    message, tenant = exchange.message, exchange.tenant
    assert message is not None and tenant is not None
    limits = exchange.admission.limits if exchange.admission is not None else None
    trial = False
    if limits is not None:
        try:
            trial = limits.admit_upstream()
        except ProxyError:
            exchange.services.metrics.limited.labels(tenant.id, "circuit").inc()
            raise
    headers = _upstream_headers(exchange, ACCEPT_BOTH)
    headers["Content-Type"] = JSON
    exchange.upstream_contacted = True
    if exchange.session is not None and message.kind is Kind.REQUEST:
        exchange.session.forward(message)
    started = time.perf_counter()
    verdict: bool | None = None  # what the circuit breaker learns; None: nothing (client gone)
    exchange.services.reports.while_waiting()
    try:
        try:
            response = await tenant.upstream.send(UpstreamRequest("POST", headers, dumps(message.body)))
        finally:
            exchange.upstream_seconds += time.perf_counter() - started
        if trial and response.status < 500:
            # The upstream answers again: decide the trial now, not when a long stream ends, so
            # the tenant's other requests need not wait for it (its outcome still counts below).
            _record_upstream(exchange, True, trial)
            trial = False
        try:
            reply = await _relay_post(exchange, response)
        finally:
            response.close()
        verdict = exchange.error_code not in _UPSTREAM_FAILURES and response.status < 500
        return reply
    except UpstreamError:
        verdict = False
        raise
    finally:
        _record_upstream(exchange, verdict, trial)


_UPSTREAM_FAILURES = frozenset({UpstreamError.code, UpstreamTimeout.code})


def _record_upstream(exchange: Exchange, success: bool | None, trial: bool) -> None:
    """What the tenant's circuit breaker and metrics learn from one upstream exchange."""
    limits = exchange.admission.limits if exchange.admission is not None else None
    if limits is not None and limits.settings.circuit_failures:
        if success is not None:
            limits.breaker.record(success, time.monotonic())
        elif trial:  # the trial ended without a verdict (client gone): let another request try
            limits.breaker.abandon()
    if success is False and exchange.ctx is not None:
        kind = "timeout" if exchange.error_code == UpstreamTimeout.code else "error"
        exchange.services.metrics.upstream_errors.labels(exchange.ctx.tenant, kind).inc()


async def _relay_post(exchange: Exchange, response: UpstreamResponse) -> web.StreamResponse:
    message = exchange.message
    assert message is not None
    if message.kind is not Kind.REQUEST:
        if response.status < 300:
            return web.Response(status=202)
    elif response.status == 404 and exchange.session is not None:
        await exchange.services.sessions.remove(exchange.session)  # the upstream forgot it: so do we
        raise SessionNotFound()
    elif message.method == "initialize" and response.status == 200:
        return await _relay_initialize(exchange, response)
    if response.content_type == EVENT_STREAM and response.status == 200:
        return await relay_post_stream(exchange, response)
    if response.content_type == JSON:
        return await _relay_json(exchange, response)
    raise UpstreamError(f"The upstream MCP server answered with HTTP {response.status}")


async def _timed(exchange: Exchange, events: AsyncIterator[T]) -> AsyncIterator[T]:
    """The upstream's events, with the time spent waiting for them counted as upstream time."""
    iterator = events.__aiter__()
    while True:
        started = time.perf_counter()
        try:
            item = await iterator.__anext__()
        except StopAsyncIteration:
            return
        finally:
            exchange.upstream_seconds += time.perf_counter() - started
        yield item


async def _read_json(exchange: Exchange, response: UpstreamResponse) -> bytes:
    started = time.perf_counter()
    try:
        return await response.read_json()
    finally:
        exchange.upstream_seconds += time.perf_counter() - started


async def _relay_initialize(exchange: Exchange, response: UpstreamResponse) -> web.Response:
    """A session exists only once the upstream has answered initialize successfully.

    The answer is read in full first (it comes at once) so that the Mcp-Session-Id header is only
    ever sent with a result; a failed handshake leaves no session on either side.
    """
    answer: JsonObject | None = None
    messages = ServerMessages(exchange)
    try:
        if response.content_type == EVENT_STREAM:
            async for batch in _timed(exchange, response.events()):
                for item in batch:
                    if isinstance(item, Event) and item.data:
                        candidate = _parse_upstream(item.data)
                        if messages.is_answer(candidate):
                            answer = candidate
                            break
                if answer is not None:
                    break
        elif response.content_type == JSON:
            answer = _parse_upstream(await _read_json(exchange, response))
    except ProxyError:
        await _abandon_upstream_session(exchange, response)
        raise
    if answer is None or not messages.is_answer(answer):
        await _abandon_upstream_session(exchange, response)
        raise UpstreamError("The upstream MCP server did not answer initialize")
    if not isinstance(answer.get("result"), dict):
        await _abandon_upstream_session(exchange, response)
        out = messages.process(answer)
        assert out is not None
        return web.Response(body=out, content_type=JSON, headers=NO_STORE)
    assert exchange.ctx is not None and exchange.tenant is not None and exchange.message is not None
    requested = exchange.message.params.get("protocolVersion")
    assert exchange.session_reservation is not None
    try:
        exchange.session = await exchange.services.sessions.create(
            exchange.ctx,
            requested if isinstance(requested, str) else DEFAULT_HANDSHAKE_VERSION,
            response.session_id,
            exchange.session_reservation,
        )
    except ProxyError:  # the shared session store failed: no session, so no upstream one either
        await _abandon_upstream_session(exchange, response)
        raise
    exchange.session_reservation = None
    now = exchange.request.app[RUNTIME].current.tenants.get(exchange.ctx.tenant)
    if now is None or now.upstream is not exchange.tenant.upstream:
        # A reload moved (or removed) the tenant while this initialize was on its way: the session
        # would hold the old upstream's session id. End both sides; the client initializes again.
        await exchange.services.sessions.remove(exchange.session)
        exchange.session = None
        await _abandon_upstream_session(exchange, response)
        raise UpstreamError("The tenant's upstream changed while the session was created; initialize again")
    out = messages.process(answer)  # settles the version the server chose
    assert out is not None
    return web.Response(
        body=out, content_type=JSON, headers={**NO_STORE, SESSION_HEADER: exchange.session.id}
    )


async def _abandon_upstream_session(exchange: Exchange, response: UpstreamResponse) -> None:
    tenant = exchange.tenant
    if tenant is None or response.session_id is None:
        return
    headers = {SESSION_HEADER: response.session_id}
    with contextlib.suppress(ProxyError):
        (await tenant.upstream.send(UpstreamRequest("DELETE", headers))).close()


async def _relay_json(exchange: Exchange, response: UpstreamResponse) -> web.Response:
    reply = _parse_upstream(await _read_json(exchange, response))
    messages = ServerMessages(exchange)
    if response.status >= 400:
        if not isinstance(reply.get("error"), dict):
            raise UpstreamError(f"The upstream MCP server answered with HTTP {response.status}")
        reply = sanitize_reply(exchange, reply)
        exchange.outcome = "error"
        return web.Response(status=response.status, body=dumps(reply), content_type=JSON, headers=NO_STORE)
    if not messages.is_answer(reply):
        raise UpstreamError("The upstream MCP server answered a different request id")
    out = messages.process(reply)
    assert out is not None  # an answer is always delivered
    return web.Response(body=out, content_type=JSON, headers=NO_STORE)


async def relay_post_stream(exchange: Exchange, response: UpstreamResponse) -> web.StreamResponse:
    stream = web.StreamResponse(status=200, headers=SSE_HEADERS)
    await stream.prepare(exchange.request)
    messages = ServerMessages(exchange)
    answered = False
    events = _timed(exchange, response.events())
    try:
        async for batch in events:
            out: list[bytes] = []  # what arrived together goes out in one write
            try:
                for item in batch:
                    if isinstance(item, Comment):
                        out.append(KEEPALIVE_BYTES)
                        continue
                    session = exchange.session
                    event_id = session.issue_event_id(item.id) if session is not None else None
                    if not item.data:
                        if event_id is not None:
                            out.append(encode_event("", event_id, item.retry))
                        continue
                    server_message = _parse_upstream(item.data)
                    final = messages.is_answer(server_message)
                    delivered = messages.process(server_message)
                    if delivered is not None:
                        out.append(encode_event(delivered, event_id, item.retry))
                        answered = answered or final
                    if answered:
                        break
            except ProxyError:  # what was good before a bad event still goes out, and first
                if out:
                    await stream.write(b"".join(out))
                raise
            if out:
                await stream.write(b"".join(out))
            if answered:
                break
    except ProxyError as error:
        if not answered:
            exchange.outcome, exchange.error_code = "error", error.code
            await stream.write(encode_event(dumps(error.to_jsonrpc(exchange.request_id))))
            answered = True
    if not answered:
        exchange.outcome, exchange.error_code = "error", UpstreamError.code
        lost = UpstreamError("The upstream MCP server ended the stream without answering")
        await stream.write(encode_event(dumps(lost.to_jsonrpc(exchange.request_id))))
    await stream.write_eof()
    await _drain(events)
    return stream


async def _drain(events: AsyncIterator[object]) -> None:
    """Read an answered stream to its end (it ends right after the answer), so its connection goes
    back to the pool instead of being closed; a stream that lingers is simply dropped."""
    with contextlib.suppress(TimeoutError, ProxyError):
        async with asyncio.timeout(DRAIN_SECONDS):
            async for _ in events:
                pass


async def relay_get(exchange: Exchange) -> web.StreamResponse:
    """Handshake era: the session's own server-to-client stream, resumable with proxy event ids."""
    session, tenant = exchange.session, exchange.tenant
    assert session is not None and tenant is not None
    if session.get_stream_open:
        raise Conflict("Conflict: this session already has an open GET stream")
    headers = _upstream_headers(exchange, EVENT_STREAM)
    headers["MCP-Protocol-Version"] = session.protocol_version
    last_event_id = single_header(exchange, "Last-Event-ID")
    if last_event_id is not None:
        upstream_id = session.upstream_event_id(last_event_id)
        if upstream_id is not None:  # an id this session never issued replays nothing
            headers["Last-Event-ID"] = upstream_id
    session.get_stream_open = True
    if session.ended is None:
        session.ended = asyncio.Event()
    try:
        response = await tenant.upstream.send(UpstreamRequest("GET", headers))
        try:
            if response.status == 404:
                await exchange.services.sessions.remove(session)
                raise SessionNotFound()
            if response.status != 200 or response.content_type != EVENT_STREAM:
                if response.status == 405:
                    raise MethodNotAllowed("Method not allowed: the upstream MCP server offers no GET stream")
                if response.status == 409:
                    raise Conflict("Conflict: this session already has an open GET stream")
                raise UpstreamError(
                    f"The upstream MCP server answered the GET stream with HTTP {response.status}"
                )
            stream = web.StreamResponse(status=200, headers=SSE_HEADERS)
            await stream.prepare(exchange.request)
            messages = ServerMessages(exchange)
            try:
                async for batch in _until(response.events(), exchange.services.shutting_down, session.ended):
                    out: list[bytes] = []
                    for item in batch:
                        if isinstance(item, Comment):
                            out.append(KEEPALIVE_BYTES)
                            continue
                        event_id = session.issue_event_id(item.id)
                        message = _parse_upstream(item.data) if item.data else None
                        delivered = _resumable(exchange, messages, message) if message is not None else None
                        if delivered is not None or event_id is not None:
                            out.append(encode_event(delivered or b"", event_id, item.retry))
                    if out:
                        await stream.write(b"".join(out))
            except ProxyError as error:
                log.info("upstream_stream_ended", tenant=tenant.id, reason=error.message)
            await stream.write_eof()
            return stream
        finally:
            response.close()
    finally:
        session.get_stream_open = False


def _resumable(exchange: Exchange, messages: ServerMessages, message: JsonObject) -> bytes | None:
    """A message on the GET stream; an answer to a request of this session whose own stream was
    lost (replayed on resumption) is delivered as that request's answer."""
    session = exchange.session
    request = (
        session.forwarded.get(message["id"])
        if session and "method" not in message and "id" in message
        else None
    )
    if request is not None:
        return ServerMessages(dataclasses.replace(exchange, message=request)).process(message)
    return messages.process(message)


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


async def forward_delete(exchange: Exchange) -> web.StreamResponse:
    session, tenant = exchange.session, exchange.tenant
    assert session is not None and tenant is not None
    status = await end_upstream_session(tenant.upstream, session)
    if status == 405:
        raise MethodNotAllowed(
            "Method not allowed: the upstream MCP server does not let clients end sessions"
        )
    await exchange.services.sessions.remove(session)
    return web.Response(status=200)


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
