"""What a client may see of the messages an upstream sends back, and the end of every exchange.

Each message an upstream sends while answering one exchange (the answer itself, and on a stream
also notifications and server-to-client requests) passes `ServerMessages.process`, which decides
whether it reaches the client and in what form.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from functools import partial
from typing import Any, Final

import structlog
from aiohttp import web

from proxy.layers.cache.store import LIST_CHANGED
from proxy.layers.containment.audit import bounded_method
from proxy.layers.data_access.catalog import Kind
from proxy.layers.data_access.stage import answer_for_upstream, filter_answer, settle_input_requests
from proxy.protocol.errors import ProxyError
from proxy.protocol.jsonrpc import Kind as MessageKind
from proxy.protocol.jsonrpc import answer_bytes, dumps
from proxy.types import Era, Exchange, JsonObject, RequestId
from proxy.upstreams.http import UpstreamRequest

log = structlog.get_logger("proxy.requests")
REQUEST_ID = web.RequestKey("request_id", str)  # the id on every log line of one HTTP request

# Codes the MCP spec gives a meaning whose `data` a client needs (-32002/-32042: earlier versions).
_MCP_SERVER_CODES: Final = frozenset({-32002, -32020, -32021, -32022, -32042})
# -32000..-32019 are implementation-defined: an upstream's own, whose messages may carry internals.
_IMPLEMENTATION_DEFINED = range(-32019, -31999)
_MAX_ERROR_MESSAGE = 500
_LISTS: Final[dict[str, Kind]] = {"tools/list": "tools", "prompts/list": "prompts"}
_LIST_CHANGED: Final[dict[str, Kind]] = {
    "notifications/tools/list_changed": "tools",
    "notifications/prompts/list_changed": "prompts",
}


def _same_id(a: Any, b: RequestId | None) -> bool:
    return b is not None and type(a) is type(b) and a == b


def sanitize_error(error: Any) -> JsonObject:
    """An upstream JSON-RPC error as the client may see it: internals (stack traces) never pass."""
    if not isinstance(error, dict):
        return {"code": -32603, "message": "Upstream server error"}
    code = error.get("code")
    if not isinstance(code, int) or isinstance(code, bool):
        return {"code": -32603, "message": "Upstream server error"}
    if code == -32603 or code in _IMPLEMENTATION_DEFINED:
        return {"code": code, "message": "Upstream server error"}
    message = error.get("message")
    text = message if isinstance(message, str) else ""
    text = "".join(ch if ch.isprintable() else " " for ch in text[:_MAX_ERROR_MESSAGE])
    clean: JsonObject = {"code": code, "message": text or "Upstream error"}
    if code in _MCP_SERVER_CODES and "data" in error:
        clean["data"] = error["data"]
    return clean


def sanitize_reply(exchange: Exchange, reply: JsonObject) -> JsonObject:
    return {"jsonrpc": "2.0", "id": exchange.request_id, "error": sanitize_error(reply.get("error"))}


class ServerMessages:
    """Filters and records the server messages of one exchange."""

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    def is_answer(self, message: JsonObject) -> bool:
        request = self.exchange.message
        return (
            request is not None
            and request.kind is MessageKind.REQUEST
            and "method" not in message
            and _same_id(message.get("id"), request.id)
        )

    def process(self, message: JsonObject) -> bytes | None:
        """The message to deliver, serialised, or None to drop it."""
        exchange = self.exchange
        if self.is_answer(message):
            return self._answer(message)
        method = message.get("method")
        if not isinstance(method, str):
            log.warning(
                "upstream_message_dropped",
                reason="response to an unknown request id",
                tenant=exchange.ctx.tenant if exchange.ctx else None,
            )
            return None
        if "id" in message:  # a server-to-client request
            if exchange.era is not Era.HANDSHAKE or exchange.session is None:
                return None  # the modern era has no back channel; never deliver one elsewhere
            own_answer = answer_for_upstream(exchange, message)
            if own_answer is not None:  # the policy answers it: the client never sees it
                answer_upstream_soon(exchange, own_answer)
                return None
            exchange.services.sessions.expect_answer(exchange.session, message["id"])
            return dumps(message)
        if exchange.tenant is not None and method in _LIST_CHANGED:
            exchange.tenant.catalog.forget(_LIST_CHANGED[method])
        self._invalidate(method, message.get("params"))
        return dumps(message)

    def _invalidate(self, method: str, params: Any) -> None:
        """A list changed or a resource was updated: the tenant's cached copies go."""
        cache, ctx = self.exchange.services.cache, self.exchange.ctx
        if cache is None or ctx is None:
            return
        if method in LIST_CHANGED:
            cache.invalidate(ctx.tenant, LIST_CHANGED[method])
        elif method == "notifications/resources/updated" and isinstance(params, dict):
            uri = params.get("uri")
            if isinstance(uri, str):
                cache.invalidate(ctx.tenant, ("resources/read",), uri)

    def _answer(self, message: JsonObject) -> bytes:
        exchange = self.exchange
        request = exchange.message
        assert request is not None
        if exchange.session is not None:
            exchange.session.answered(request.id)
        if "error" in message or not isinstance(message.get("result"), dict):
            exchange.outcome = "error"
            error = sanitize_error(message.get("error"))
            exchange.error_code = error["code"]
            return dumps({"jsonrpc": "2.0", "id": request.id, "error": error})
        result = message["result"]
        if exchange.tenant is not None and request.method in _LISTS:
            exchange.tenant.catalog.learn(_LISTS[request.method], result)
        if request.method == "initialize" and exchange.session is not None:
            version = result.get("protocolVersion")
            if isinstance(version, str):  # the session speaks what the server chose
                exchange.session.protocol_version = version
        if result.get("resultType") == "input_required" and exchange.ctx is not None:
            try:
                result = settle_input_requests(exchange, result)
            except ProxyError as refusal:
                exchange.error_code = refusal.code
                return dumps(refusal.to_jsonrpc(request.id))
        filtered = filter_answer(exchange, result)
        raw = dumps(filtered)
        exchange.record_result(raw)
        _store(exchange, filtered, raw)
        return answer_bytes(request.id, raw)


_ANSWERS_TO_UPSTREAM: set[asyncio.Task[None]] = set()


def answer_upstream_soon(exchange: Exchange, answer: JsonObject) -> None:
    """Send the proxy's own answer to a server-to-client request, on the exchange's session."""
    session, tenant = exchange.session, exchange.tenant
    if session is None or tenant is None or session.upstream_session_id is None:
        return
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "Mcp-Session-Id": session.upstream_session_id,
        "MCP-Protocol-Version": session.protocol_version,
    }
    upstream = tenant.upstream

    async def send() -> None:
        with contextlib.suppress(ProxyError):
            (await upstream.send(UpstreamRequest("POST", headers, dumps(answer)))).close()

    task = asyncio.get_running_loop().create_task(send())
    _ANSWERS_TO_UPSTREAM.add(task)
    task.add_done_callback(_ANSWERS_TO_UPSTREAM.discard)


def _store(exchange: Exchange, result: JsonObject, raw: bytes) -> None:
    cache, plan = exchange.services.cache, exchange.cache_plan
    if cache is None or plan is None:
        return
    target = plan.store_key_and_ttl(result)
    if target is None:
        return
    if cache.put(target[0], raw, target[1]) and exchange.cache_flight is not None:
        cache.settle(exchange.cache_flight, raw)
        exchange.cache_flight = None


def _measure(exchange: Exchange) -> None:
    metrics, ctx, message = exchange.services.metrics, exchange.ctx, exchange.message
    if ctx is None:
        metrics.rejected.labels(str(exchange.status)).inc()
        return
    metrics.observe_request(
        ctx.tenant,
        message.method if message is not None else None,
        exchange.outcome,
        exchange.duration_seconds,
        exchange.upstream_seconds if exchange.upstream_contacted else None,
        exchange.cache_state if message is not None and message.kind is MessageKind.REQUEST else None,
    )


def finish(exchange: Exchange) -> None:
    """Every exchange ends here, answered or refused: what it held is given back at once; its
    report (audit record, metrics, one structured line, never any content) follows the answer."""
    services = exchange.services
    if exchange.cache_flight is not None and services.cache is not None:
        services.cache.settle(exchange.cache_flight, None)  # followers go upstream themselves
        exchange.cache_flight = None
    if exchange.admission is not None and exchange.ctx is not None:
        services.limiter.release(exchange.ctx.tenant, exchange.admission)
        exchange.admission = None
    if exchange.session_reservation is not None and exchange.ctx is not None:
        services.sessions.release(exchange.ctx.tenant, exchange.session_reservation)  # no session came of it
        exchange.session_reservation = None
    if exchange.holds_session and exchange.session is not None:
        exchange.session.busy -= 1
        exchange.session.last_seen = time.monotonic()
        exchange.holds_session = False
    exchange.ended = time.perf_counter()
    exchange.ended_at = time.time()
    services.reports.add(partial(report, exchange))


def report(exchange: Exchange) -> None:
    exchange.services.audit.record(exchange)
    _measure(exchange)
    message = exchange.message
    log.info(
        "mcp_request",
        request_id=exchange.request.get(REQUEST_ID),
        http_method=exchange.request.method,
        tenant=exchange.ctx.tenant if exchange.ctx else None,
        era=exchange.era.value if exchange.era else None,
        method=bounded_method(message.method if message else None),
        outcome=exchange.outcome,
        cache=exchange.cache_state,
        error_code=exchange.error_code,
        duration_ms=round(exchange.duration_seconds * 1000, 3),
    )
