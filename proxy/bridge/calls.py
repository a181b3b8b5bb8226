"""2026-07-28 requests carried on held handshake-era sessions (held.py): one call at a time.

    server/discover        answered from the held session's initialize result
    subscriptions/listen   on the held session's subscriptions and GET stream (listen.py)
    a request              sent on the session under an id of the proxy's (and a progress token of
                           its own), its stream relayed as 2026-07-28 shapes it: the answer with
                           resultType, progress with the caller's token, log messages only as asked
                           for in _meta; an upstream that closes a resumable stream is resumed
    a server request       sampling, elicitation or roots during the call (those the session's
                           client capabilities declare) end the stream with an input_required result;
                           the call waits, its upstream request open, for the client's retry
    a retry                its requestState (sealed to the caller by the containment layer before it
                           left) names the waiting call; inputResponses answer the upstream's requests
                           on the held session and the call's stream goes on as the retry's answer
    the stream closed      before the answer: the upstream is told (notifications/cancelled)

A waiting call lives in this process for sessions.answer_timeout_seconds; then its upstream requests
are answered with an error and the call is cancelled.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

from proxy.bridge.answers import Answered, event
from proxy.bridge.held import HeldSession, HeldSessions, post, post_and_close
from proxy.bridge.listen import Listens
from proxy.bridge.shapes import (
    LOG_LEVEL_META,
    PROGRESS_TOKEN,
    answered_here,
    call_notification,
    discover_result,
    for_the_client,
    handshake_params,
    member,
    meta_of,
    modern_answer,
)
from proxy.protocol.errors import InvalidParams, UpstreamError
from proxy.protocol.sse import KEEPALIVE, Comment, Event
from proxy.types import JsonObject, RequestId
from proxy.upstreams.base import (
    EVENT_STREAM,
    JSON,
    Incoming,
    UpstreamRequest,
    UpstreamResponse,
    incoming,
    parse_upstream,
    same_id,
)

log = structlog.get_logger("proxy.bridge")

WAITING_PREFIX: Final = "mtp-bridge-wait."
TIMED_OUT_CODE: Final = -32001
# The client capability a server-to-client request needs.
ASKS: Final = {
    "sampling/createMessage": "sampling",
    "elicitation/create": "elicitation",
    "roots/list": "roots",
}
_ids = itertools.count(1)


@dataclass(eq=False)
class BridgedCall:
    """A 2026-07-28 request in flight on a held session, or waiting for its client's input."""

    held: HeldSession
    upstream_id: str
    method: str | None
    response: UpstreamResponse
    events: AsyncIterator[list[Incoming]]
    client_id: RequestId | None
    client_token: Any  # the progress token of the request now being answered (None: no progress)
    log_level: Any
    last_event_id: str = ""
    done: bool = False
    waiting: dict[str, RequestId] | None = None  # inputRequests key -> the upstream's request id
    expiry: asyncio.TimerHandle | None = None
    asked: int = field(default=0)


class CallStream:
    """The relay's view of a bridged call: an SSE answer carrying 2026-07-28 messages."""

    status = 200
    content_type = EVENT_STREAM
    session_id: str | None = None
    retry_after: str | None = None

    def __init__(self, bridge: HandshakeBridge, call: BridgedCall) -> None:
        self._bridge = bridge
        self._call = call

    async def read_json(self) -> bytes:
        raise UpstreamError("The bridged call answers as a stream")

    def events(self) -> AsyncIterator[list[Event | Comment]]:
        return self._bridge.relay(self._call)

    def close(self) -> None:
        self._bridge.closed(self._call)


class HandshakeBridge:
    """A tenant's 2026-07-28 callers served by its handshake-era upstream."""

    def __init__(self, sessions: HeldSessions, answer_timeout_seconds: float) -> None:
        self.sessions = sessions
        self.upstream = sessions.upstream
        self.answer_timeout_seconds = answer_timeout_seconds
        self.listens = Listens(sessions)
        self._waiting: dict[str, BridgedCall] = {}
        self._sent: set[asyncio.Task[None]] = set()

    async def forward(self, held: HeldSession, request: UpstreamRequest) -> UpstreamResponse | None:
        """A 2026-07-28 message on `held`; None when the upstream no longer knows the session."""
        body = parse_upstream(request.body or b"{}")
        request_id = body.get("id")
        if "method" not in body or request_id is None:
            return Answered(202)  # a notification: 2026-07-28 cancels by closing the stream
        params = body.get("params")
        state = params.get("requestState") if isinstance(params, dict) else None
        if isinstance(state, str) and state.startswith(WAITING_PREFIX):
            return await self._resume(held, body, state)
        if body["method"] == "server/discover":
            return Answered.result(request_id, discover_result(held.initialize_result))
        if body["method"] == "subscriptions/listen":
            return await self.listens.open(held, body)
        return await self._start(held, body)

    async def _start(self, held: HeldSession, body: JsonObject) -> UpstreamResponse | None:
        upstream_id = f"mcp-tenant-proxy-bridge-{next(_ids)}"
        meta = meta_of(body.get("params"))
        client_token = meta.get(PROGRESS_TOKEN)
        params = handshake_params(body.get("params"), upstream_id if client_token is not None else None)
        message = {"jsonrpc": "2.0", "id": upstream_id, "method": body["method"], "params": params}
        response = await post(self.upstream, held, message)
        if response.status != 200:
            return await self._refused(held, response, body.get("id"))
        call = BridgedCall(
            held, upstream_id, body["method"], response, incoming(response), body.get("id"), client_token,
            meta.get(LOG_LEVEL_META),
        )  # fmt: skip
        if response.content_type == JSON:  # (no server requests in a JSON answer)
            answer = None
            async for batch in self.relay(call):
                answer = next((e for e in batch if isinstance(e, Event)), answer)
            response.close()
            if answer is None:
                raise UpstreamError("The upstream MCP server answered a different request id")
            return Answered(200, json.loads(answer.data))
        return CallStream(self, call)

    async def _refused(
        self, held: HeldSession, response: UpstreamResponse, client_id: Any
    ) -> UpstreamResponse | None:
        """A non-200 answer: the session forgotten (404, or an error answering no request), or the
        upstream's refusal of this request, passed on."""
        try:
            answer = parse_upstream(await response.read_json()) if response.content_type == JSON else None
        finally:
            response.close()
        gone = response.status == 404 or (
            response.status == 400 and answer is not None and answer.get("id") is None
        )
        if gone and held.upstream_session_id is not None:
            return None
        if answer is None or not isinstance(answer.get("error"), dict):
            raise UpstreamError(f"The upstream MCP server answered with HTTP {response.status}")
        return Answered(response.status, {"jsonrpc": "2.0", "id": client_id, "error": answer["error"]})

    async def relay(self, call: BridgedCall) -> AsyncIterator[list[Event | Comment]]:
        """The call's upstream stream as 2026-07-28 messages, up to its answer or its first request
        for the client's input."""
        while True:
            async for batch in call.events:
                out: list[Event | Comment] = []
                asks: dict[str, JsonObject] = {}
                for item in batch:
                    if item.keepalive:
                        out.append(KEEPALIVE)
                    if item.event_id:
                        call.last_event_id = item.event_id
                    message = item.message
                    if message is None:
                        continue
                    if "method" not in message:
                        if same_id(message.get("id"), call.upstream_id):
                            out.append(event(modern_answer(call.client_id, call.method, message)))
                            call.done = True
                            break
                    elif "id" in message:
                        self._asked(call, message, asks)
                    else:
                        note = call_notification(message, call.upstream_id, call.client_token, call.log_level)
                        if note is not None:
                            out.append(event(note))
                if asks and not call.done:
                    out.append(event(self._wait(call, asks)))
                if out:
                    yield out
                if call.done or call.waiting is not None:
                    return
            await self._resume_stream(call)

    async def _resume_stream(self, call: BridgedCall) -> None:
        """The stream ended before the answer: a resumable one (an event id, a session) is resumed
        with GET and Last-Event-ID, as a client of the upstream would."""
        held = call.held
        if not call.last_event_id or held.upstream_session_id is None:
            raise UpstreamError("The upstream MCP server ended the stream without answering")
        headers = {**held.headers(EVENT_STREAM), "Last-Event-ID": call.last_event_id}
        del headers["Content-Type"]
        response = await self.upstream.send(UpstreamRequest("GET", headers, None, held.principal))
        if response.status != 200 or response.content_type != EVENT_STREAM:
            response.close()
            raise UpstreamError("The upstream MCP server ended the stream without answering")
        call.response.close()
        call.response, call.events = response, incoming(response)

    def _asked(self, call: BridgedCall, request: JsonObject, asks: dict[str, JsonObject]) -> None:
        """A server request during the call: for the client when its capabilities offer it, else
        answered here."""
        if for_the_client(request, call.held.declared.capabilities):
            call.asked += 1
            asks[f"input-{call.asked}"] = request
        else:
            self._send_soon(call.held, answered_here(request))

    def _wait(self, call: BridgedCall, asks: dict[str, JsonObject]) -> JsonObject:
        """The call waits for its client's input: input_required, and a state naming the call."""
        token = WAITING_PREFIX + secrets.token_urlsafe(24)
        call.waiting = {key: request["id"] for key, request in asks.items()}
        call.held.users += 1  # a waiting call keeps its session
        self._waiting[token] = call
        call.expiry = asyncio.get_running_loop().call_later(self.answer_timeout_seconds, self._expire, token)
        requests = {key: {"method": r["method"], "params": r.get("params") or {}} for key, r in asks.items()}
        result = {"resultType": "input_required", "inputRequests": requests, "requestState": token}
        return {"jsonrpc": "2.0", "id": call.client_id, "result": result}

    async def _resume(self, held: HeldSession, body: JsonObject, token: str) -> UpstreamResponse:
        call = self._waiting.get(token)
        if call is None or call.held.principal != held.principal:
            raise InvalidParams(
                "Invalid params: the call this requestState continues is no longer waiting here (it "
                "was answered, timed out, or another replica holds it); start the request again"
            )
        del self._waiting[token]
        if call.expiry is not None:
            call.expiry.cancel()
        params = member(body, "params")
        given = params.get("inputResponses")
        for key, server_id in (call.waiting or {}).items():
            answer = given.get(key) if isinstance(given, dict) else None
            reply: JsonObject = {"jsonrpc": "2.0", "id": server_id}
            if isinstance(answer, dict):
                reply["result"] = answer
            else:
                reply["error"] = {"code": -32602, "message": "The client gave no answer to this request"}
            await post_and_close(self.upstream, call.held, reply)
        meta = meta_of(params)
        call.waiting, call.client_id = None, body.get("id")
        call.client_token, call.log_level = meta.get(PROGRESS_TOKEN), meta.get(LOG_LEVEL_META)
        self.sessions.give_back(call.held)  # (the retry's own exchange holds it now)
        return CallStream(self, call)

    def _expire(self, token: str) -> None:
        call = self._waiting.pop(token, None)
        if call is None:
            return
        log.info("bridge_input_timed_out", tenant=self.sessions.tenant)
        waited = f"{self.answer_timeout_seconds:g}"
        error = {
            "code": TIMED_OUT_CODE,
            "message": f"Request timed out: the client did not answer within {waited} s",
        }
        for server_id in (call.waiting or {}).values():
            self._send_soon(call.held, {"jsonrpc": "2.0", "id": server_id, "error": error})
        call.waiting = None
        self._cancel(call)
        self.sessions.give_back(call.held)

    def closed(self, call: BridgedCall) -> None:
        """The relay is done with the call's stream: answered, waiting, or abandoned by the client."""
        if call.waiting is not None:
            return  # it goes on with the client's retry
        if call.done:
            call.response.close()
        else:
            self._cancel(call)

    def _cancel(self, call: BridgedCall) -> None:
        call.done = True
        call.response.close()
        cancel = {"requestId": call.upstream_id, "reason": "The client closed the request"}
        self._send_soon(call.held, {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": cancel})

    def _send_soon(self, held: HeldSession, message: JsonObject) -> None:
        task = asyncio.create_task(post_and_close(self.upstream, held, message))
        self._sent.add(task)
        task.add_done_callback(self._sent.discard)

    def close(self) -> None:
        """Shutdown or reload: listens end, waiting calls are cancelled (their retries find nothing)."""
        self.listens.close()
        for token in list(self._waiting):
            call = self._waiting.pop(token)
            if call.expiry is not None:
                call.expiry.cancel()
            call.waiting = None
            self._cancel(call)
            self.sessions.give_back(call.held)
