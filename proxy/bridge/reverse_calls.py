"""One handshake-era client's request on a 2026-07-28 upstream (the reverse bridge's calls).

    sent             statelessly: the session's _meta envelope, the 2026-07-28 headers (Mcp-Method,
                     Mcp-Name, and Mcp-Param-* as the catalog knows the tool); a refusal goes back
                     as the handshake era answers one (HTTP 200, its JSON-RPC error)
    relayed          its progress and log messages, then its answer without resultType or hints
    input_required   each input request goes to the client as a server-to-client request on the
                     call's stream (through the same hooks as any: policy, owed answers); the
                     client's answers, POSTed on its session, come back through `answered`, and the
                     call is sent again with them as inputResponses and the upstream's requestState
    cancelled        notifications/cancelled, or the client gone: the upstream stream is closed

What a call waits for lives in this process: the client's answers must reach the same replica.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final

from proxy.bridge.answers import Answered, event
from proxy.bridge.shapes import handshake_result, member, meta_of
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
    incoming,
    parse_upstream,
    same_id,
)

MAX_ROUNDS: Final = 10  # input_required rounds of one call (as the SDK clients allow)
TIMED_OUT_CODE: Final = -32001
_ids = itertools.count(1)
Key = tuple[str, RequestId]  # (the session's token, the client's request id)


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
    retry_after: str | None = None

    def __init__(self, events: AsyncIterator[list[Event | Comment]], on_close: Callable[[], None]) -> None:
        self._events = events
        self._on_close = on_close

    async def read_json(self) -> bytes:
        raise UpstreamError("The bridged call answers as a stream")

    def events(self) -> AsyncIterator[list[Event | Comment]]:
        return self._events

    def close(self) -> None:
        self._on_close()


class ReverseCalls:
    def __init__(self, upstream: Upstream, catalog: Catalog, answer_timeout_seconds: float) -> None:
        self.upstream = upstream
        self.catalog = catalog
        self.answer_timeout_seconds = answer_timeout_seconds
        self._calls: dict[Key, ReverseCall] = {}
        self._owed: dict[Key, asyncio.Future[JsonObject]] = {}  # asked of the client, by server request id

    def headers(self, body: JsonObject) -> dict[str, str]:
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

    async def start(
        self, token: str, body: JsonObject, envelope: JsonObject, principal: str | None
    ) -> UpstreamResponse:
        """The call sent with the session's envelope in its _meta; its stream, or the refusal."""
        params = member(body, "params")
        modern = {**body, "params": {**params, "_meta": {**meta_of(params), **envelope}}}
        response = await self.post(modern, principal)
        if response.status != 200:
            return await self._refused(response, body.get("id"))
        request_id = body.get("id")
        assert isinstance(request_id, str | int)  # (a request: the flow parsed it)
        key = (token, request_id)
        call = ReverseCall(response)
        self._calls[key] = call
        return ReverseStream(self._relay(key, call, modern, principal), lambda: self._end(key))

    async def post(self, body: JsonObject, principal: str | None) -> UpstreamResponse:
        return await self.upstream.send(UpstreamRequest("POST", self.headers(body), dumps(body), principal))

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

    def answered(self, token: str, answer: JsonObject) -> None:
        """The client's answer to a server request of one of its session's calls."""
        request_id = answer.get("id")
        owed = self._owed.pop((token, request_id), None) if isinstance(request_id, str | int) else None
        if owed is not None and not owed.done():
            owed.set_result(answer)

    def close(self) -> None:
        for key in list(self._calls):
            self._end(key)

    def cancel(self, token: str, params: Any) -> None:
        """notifications/cancelled: the call's upstream stream is closed (2026-07-28 cancellation)."""
        wanted = params.get("requestId") if isinstance(params, dict) else None
        if isinstance(wanted, str | int):
            self._end((token, wanted))

    def _end(self, key: Key) -> None:
        call = self._calls.pop(key, None)
        if call is None:
            return
        call.cancelled = True
        call.response.close()
        for owed in call.owed:
            owed.cancel()

    async def _relay(
        self, key: Key, call: ReverseCall, body: JsonObject, principal: str | None
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
                call.response = await self.post(body, principal)
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
