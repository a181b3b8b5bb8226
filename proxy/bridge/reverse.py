"""Handshake-era clients served by a 2026-07-28 upstream that keeps no sessions of its own.

    initialize             forwarded as it is; an upstream that answers it with a session keeps
                           serving it unbridged. One that answers without a session (stateless) or
                           refuses it, and speaks 2026-07-28, is bridged: the proxy keeps the session
                           on its side (its upstream session id is a token holding the client's
                           capabilities and info) and answers initialize from the upstream's answer
                           or from server/discover
    a request              sent statelessly, its _meta built from the session's initialize (and
                           logging/setLevel), with the 2026-07-28 headers; results lose resultType
                           and cache hints
    input_required         each input request goes to the client as a server-to-client request on
                           the call's stream; their answers (POSTed on the session) go back to the
                           upstream as inputResponses with its requestState, until the call completes
    ping, setLevel         answered here; GET is a stream of keep-alives; DELETE forgets the session
    notifications/cancelled  closes the call's upstream stream (2026-07-28 cancellation)

What a call waits for lives in this process: the client's answers must reach the same replica.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

from proxy.bridge.answers import Answered, event
from proxy.bridge.shapes import (
    handshake_result,
    initialize_result,
    meta_of,
    modern_envelope,
    reverse_session_state,
    reverse_session_token,
)
from proxy.layers.data_access.catalog import Catalog
from proxy.protocol.errors import ProxyError, UpstreamError
from proxy.protocol.headers import (
    METHOD_HEADER,
    NAME_HEADER,
    PROTOCOL_VERSION_HEADER,
    encode_header_value,
    render_param_headers,
)
from proxy.protocol.jsonrpc import NAME_BEARING_METHODS, dumps
from proxy.protocol.sse import KEEPALIVE, Comment, Event
from proxy.types import LATEST_MODERN_VERSION, JsonObject, RequestId
from proxy.upstreams.base import (
    EVENT_STREAM,
    JSON,
    Upstream,
    UpstreamRequest,
    UpstreamResponse,
    answer_to,
    incoming,
    parse_upstream,
    same_id,
)
from proxy.upstreams.eras import UpstreamEras

KEEPALIVE_SECONDS: Final = 15.0
MAX_SESSIONS_REMEMBERED: Final = 10_000  # log levels kept per session (the oldest forgotten first)
NOT_BRIDGED: Final = frozenset(
    {
        "resources/subscribe",
        "resources/unsubscribe",
        "tasks/get",
        "tasks/result",
        "tasks/list",
        "tasks/cancel",
    }
)
MAX_ROUNDS: Final = 10  # input_required rounds of one call (as the SDK clients allow)
TIMED_OUT_CODE: Final = -32001
_ids = itertools.count(1)


@dataclass(eq=False)
class ReverseCall:
    """A handshake client's request in flight on the upstream, across its input_required rounds."""

    response: UpstreamResponse
    cancelled: bool = False
    owed: tuple[asyncio.Future[JsonObject], ...] = ()  # the client's answers the call waits for


class ReverseStream:
    """The relay's view of a bridged call: an SSE answer carrying handshake-era messages."""

    status = 200
    content_type = EVENT_STREAM
    session_id: str | None = None

    def __init__(self, events: AsyncIterator[list[Event | Comment]], on_close: Any) -> None:
        self._events = events
        self._on_close = on_close

    async def read_json(self) -> bytes:
        raise UpstreamError("The bridged call answers as a stream")

    def events(self) -> AsyncIterator[list[Event | Comment]]:
        return self._events

    def close(self) -> None:
        self._on_close()


class IdleStream:
    """A bridged session's GET stream: the upstream has none, so it carries keep-alives only."""

    status = 200
    content_type = EVENT_STREAM
    session_id: str | None = None

    async def read_json(self) -> bytes:
        return b"{}"

    async def events(self) -> AsyncIterator[list[Event | Comment]]:
        while True:
            await asyncio.sleep(KEEPALIVE_SECONDS)
            yield [KEEPALIVE]

    def close(self) -> None:
        """Nothing is held."""


class ReverseBridge:
    def __init__(
        self, upstream: Upstream, eras: UpstreamEras, catalog: Catalog, answer_timeout_seconds: float
    ) -> None:
        self.tenant = upstream.tenant
        self.identity = upstream.identity
        self.upstream = upstream
        self.eras = eras
        self.catalog = catalog
        self.answer_timeout_seconds = answer_timeout_seconds
        self._levels: OrderedDict[str, str] = OrderedDict()  # session token -> logging/setLevel
        self._calls: dict[tuple[str, RequestId], ReverseCall] = {}
        self._owed: dict[tuple[str, RequestId], asyncio.Future[JsonObject]] = {}  # asked of the client

    # --- the Upstream protocol, for the bridged sessions' exchanges ------------------------------

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        token = request.headers.get("Mcp-Session-Id")
        if reverse_session_state(token) is None:  # an initialize, or the upstream's own session
            if request.http_method == "POST" and token is None:
                return await self._initialize(request, parse_upstream(request.body or b"{}"))
            return await self.upstream.send(request)
        assert token is not None
        if request.http_method == "DELETE":
            self._levels.pop(token, None)
            return Answered(200)
        if request.http_method == "GET":
            return IdleStream()
        body = parse_upstream(request.body or b"{}")
        method, request_id = body.get("method"), body.get("id")
        if method is None:  # the client's answer to a server request of a call
            owed = self._owed.pop((token, request_id), None) if isinstance(request_id, str | int) else None
            if owed is not None and not owed.done():
                owed.set_result(body)
            return Answered(202)
        if request_id is None:
            if method == "notifications/cancelled":
                self._cancel(token, body.get("params"))
            return Answered(202)
        if method == "ping":
            return Answered.result(request_id, {})
        if method == "logging/setLevel":
            self._remember_level(token, body.get("params"))
            return Answered.result(request_id, {})
        if method in NOT_BRIDGED:
            return Answered.error(200, request_id, -32601, f"Method not found: {method} is not bridged to "
                                  "this tenant's 2026-07-28 MCP server")  # fmt: skip
        return await self._start(token, body, request.principal)

    async def sweep(self) -> None:
        """Nothing to tidy: what a call waits for ends with it."""

    async def close(self) -> None:
        for call in list(self._calls.values()):
            call.cancelled = True
            call.response.close()

    # --- initialize ------------------------------------------------------------------------------

    async def _initialize(self, request: UpstreamRequest, body: JsonObject) -> UpstreamResponse:
        """Forwarded; bridged when the upstream keeps no session but speaks 2026-07-28."""
        response = await self.upstream.send(request)
        if response.session_id is not None or response.status not in (200, 400, 404, 405):
            return response
        try:
            if response.status == 200:
                answer = await answer_to(response, body.get("id"))
            else:
                answer = parse_upstream(await response.read_json()) if response.content_type == JSON else None
        finally:
            response.close()
        if await self.eras.speaks_modern(self.upstream) is not True:
            return Answered(response.status, answer)  # as the upstream answered it: not bridged
        params = _params(body)
        capabilities = params.get("capabilities") if isinstance(params.get("capabilities"), dict) else {}
        token = reverse_session_token(capabilities, params.get("clientInfo"))
        result = answer.get("result") if answer is not None else None
        if not isinstance(result, dict):  # it refused initialize: the session is answered from discover
            discover = await self._discover(token, request.principal)
            result = initialize_result(params.get("protocolVersion"), discover)
        return Answered.result(body.get("id"), result, session_id=token)

    async def _discover(self, token: str, principal: str | None) -> JsonObject:
        request_id = f"mcp-tenant-proxy-bridge-discover-{next(_ids)}"
        body = {"jsonrpc": "2.0", "id": request_id, "method": "server/discover",
                "params": {"_meta": self._envelope(token)}}  # fmt: skip
        response = await self.upstream.send(
            UpstreamRequest("POST", self._headers(body), dumps(body), principal)
        )
        try:
            answer = await answer_to(response, request_id) if response.status == 200 else None
        finally:
            response.close()
        result = answer.get("result") if answer is not None else None
        if not isinstance(result, dict):
            raise UpstreamError("The upstream MCP server did not answer server/discover")
        return result

    # --- requests --------------------------------------------------------------------------------

    def _envelope(self, token: str) -> JsonObject:
        state = reverse_session_state(token)
        capabilities, client_info = state if state is not None else ({}, {})
        return modern_envelope(capabilities, client_info, self._levels.get(token))

    def _headers(self, body: JsonObject) -> dict[str, str]:
        method, params = str(body.get("method")), body.get("params")
        headers = {
            "Content-Type": JSON,
            "Accept": "application/json, text/event-stream",
            PROTOCOL_VERSION_HEADER: LATEST_MODERN_VERSION,
            METHOD_HEADER: method,
        }
        name_key = NAME_BEARING_METHODS.get(method)
        name = params.get(name_key) if name_key and isinstance(params, dict) else None
        if isinstance(name, str):
            headers[NAME_HEADER] = encode_header_value(name)
            entry = self.catalog.cached("tools", name) if method == "tools/call" else None
            arguments = params.get("arguments") if isinstance(params, dict) else None
            if entry is not None and entry.param_headers and isinstance(arguments, dict):
                headers.update(render_param_headers(entry.param_headers, arguments))
        return headers

    async def _start(self, token: str, body: JsonObject, principal: str | None) -> UpstreamResponse:
        params = _params(body)
        modern = {**body, "params": {**params, "_meta": {**meta_of(params), **self._envelope(token)}}}
        response = await self._post(modern, principal)
        if response.status != 200:
            return await self._refused(response, body.get("id"))
        request_id = body.get("id")
        assert isinstance(request_id, str | int)  # (a request: the flow parsed it)
        key = (token, request_id)
        call = ReverseCall(response)
        self._calls[key] = call
        return ReverseStream(self._relay(key, call, modern, principal), lambda: self._end(key))

    async def _post(self, body: JsonObject, principal: str | None) -> UpstreamResponse:
        return await self.upstream.send(UpstreamRequest("POST", self._headers(body), dumps(body), principal))

    @staticmethod
    async def _refused(response: UpstreamResponse, request_id: Any) -> Answered:
        """The upstream refused the request: its JSON-RPC error, as the handshake era answers one."""
        try:
            answer = parse_upstream(await response.read_json()) if response.content_type == JSON else None
        finally:
            response.close()
        if answer is None or not isinstance(answer.get("error"), dict):
            raise UpstreamError(f"The upstream MCP server answered with HTTP {response.status}")
        return Answered(200, {"jsonrpc": "2.0", "id": request_id, "error": answer["error"]})

    def _remember_level(self, token: str, params: Any) -> None:
        level = params.get("level") if isinstance(params, dict) else None
        if isinstance(level, str):
            self._levels[token] = level
            self._levels.move_to_end(token)
            while len(self._levels) > MAX_SESSIONS_REMEMBERED:
                self._levels.popitem(last=False)

    def _cancel(self, token: str, params: Any) -> None:
        """notifications/cancelled: the call's upstream stream is closed (2026-07-28 cancellation)."""
        wanted = params.get("requestId") if isinstance(params, dict) else None
        if isinstance(wanted, str | int):
            self._end((token, wanted))

    def _end(self, key: tuple[str, RequestId]) -> None:
        call = self._calls.pop(key, None)
        if call is None:
            return
        call.cancelled = True
        call.response.close()
        for owed in call.owed:
            owed.cancel()

    async def _relay(
        self, key: tuple[str, RequestId], call: ReverseCall, body: JsonObject, principal: str | None
    ) -> AsyncIterator[list[Event | Comment]]:
        """The call's upstream stream to its answer; each input_required becomes server requests on
        it, whose answers go back as the retry's inputResponses."""
        token, client_id = key
        try:
            for _ in range(MAX_ROUNDS):
                answer: JsonObject | None = None
                async for batch in incoming(call.response):
                    out: list[Event | Comment] = [KEEPALIVE] if any(i.keepalive for i in batch) else []
                    for item in batch:
                        message = item.message
                        if message is not None and "method" in message and "id" not in message:
                            out.append(event(message))  # the call's progress and log messages
                        elif message is not None and same_id(message.get("id"), client_id):
                            answer = message
                    if out:
                        yield out
                    if answer is not None:
                        break
                call.response.close()
                result = answer.get("result") if answer is not None else None
                if (
                    answer is None
                    or not isinstance(result, dict)
                    or result.get("resultType") != "input_required"
                ):
                    if answer is None:
                        raise UpstreamError("The upstream MCP server ended the stream without answering")
                    if isinstance(result, dict):
                        answer = {**answer, "result": handshake_result(result)}
                    yield [event(answer)]
                    return
                asks = result.get("inputRequests")
                owed = [
                    (k, f"mtp-bridge-ask-{next(_ids)}", a)
                    for k, a in (asks.items() if isinstance(asks, dict) else ())
                ]
                futures = {k: asyncio.get_running_loop().create_future() for k, _, _ in owed}
                for k, server_id, _ in owed:
                    self._owed[(token, server_id)] = futures[k]
                call.owed = tuple(futures.values())
                try:
                    if owed:
                        yield [event(_server_request(server_id, asked)) for _, server_id, asked in owed]
                    responses = await self._answers(futures)
                finally:
                    for _, server_id, _ in owed:
                        self._owed.pop((token, server_id), None)
                if not isinstance(responses, dict):  # refused, or never answered: so is the call
                    yield [event({"jsonrpc": "2.0", "id": client_id, "error": responses[0]})]
                    return
                params = {**body["params"], "inputResponses": responses}
                params.pop("requestState", None)
                if isinstance(result.get("requestState"), str):
                    params["requestState"] = result["requestState"]
                body = {**body, "params": params}
                call.response = await self._post(body, principal)
                if call.response.status != 200:
                    refusal = await self._refused(call.response, client_id)
                    yield [event(await _body_of(refusal))]
                    return
            raise UpstreamError("The upstream MCP server asked for input too many times")
        except (ProxyError, asyncio.CancelledError):
            if call.cancelled:
                return
            raise
        finally:
            self._end(key)

    async def _answers(self, futures: dict[str, asyncio.Future[JsonObject]]) -> JsonObject | list[JsonObject]:
        """The client's answers by inputRequests key; or the error that ends the call (a refusal, or
        no answer in time), as a one-item list."""
        responses: JsonObject = {}
        try:
            async with asyncio.timeout(self.answer_timeout_seconds + 5):
                for key, future in futures.items():
                    reply = await future
                    if not isinstance(reply.get("result"), dict):
                        error = reply.get("error")
                        refused = {"code": -32603, "message": "The client refused the server's request"}
                        return [error if isinstance(error, dict) else refused]
                    responses[key] = reply["result"]
        except TimeoutError:
            return [{"code": TIMED_OUT_CODE, "message": "Request timed out: the client did not answer"}]
        return responses


async def _body_of(answer: Answered) -> JsonObject:
    return parse_upstream(await answer.read_json())


def _server_request(server_id: str, asked: Any) -> JsonObject:
    """An input request of a 2026-07-28 result, as the server-to-client request it was before."""
    asked = asked if isinstance(asked, dict) else {}
    return {
        "jsonrpc": "2.0",
        "id": server_id,
        "method": asked.get("method"),
        "params": asked.get("params") or {},
    }


def _params(body: JsonObject) -> JsonObject:
    params = body.get("params")
    return params if isinstance(params, dict) else {}
