"""OpenTelemetry traces, exported over OTLP/HTTP (the optional `tracing` extra).

Only with `tracing.enabled` is this module imported and each flow of http/endpoint.py built, once at
start-up, with these steps added (`traced` there); without it the flows are the plain lists and
requests pay nothing for tracing:

    arrive        first edge check     the exchange's start (nothing else is known yet)
    authenticate  around that step     event `authentication`: the tenant, or the refusal's code
    open_span     first stage          the SERVER span, once the message (and its `_meta`) is read;
                                       its trace id joins the log context of the request
    event         around named stages  events `policy` (the outcome so far) and `cache` (its state)
    upstream      around forward       a CLIENT span for the upstream call, whose context goes
                                       upstream: a `traceparent` header (HTTP) and, in requests,
                                       `params._meta.traceparent` (which MCP 2026-07-28 reserves for
                                       it; the only carrier a stdio server has)
    close         first done hook      outcome, error code, cache state; the span ends at the
                                       exchange's end (a refusal before `open_span` gets its span
                                       here); the audit record and the log line name the trace

Whose trace: with `tracing.trust_client_context`, an authenticated client's context (its
`params._meta.traceparent`, else its `traceparent` header) is the parent, and its sampling decision
holds. Without it (the default) every exchange starts a new trace: a client cannot place its
requests into someone else's trace, nor choose what the proxy's upstream request is part of (a
client's `_meta.traceparent` is replaced by the proxy's own). Attributes are names (tenant, method,
tool or prompt), never argument values, results or tokens. Refusals by a tenant's limits get no
span of their own (a flood of them would drown the exporter), as they get no log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import structlog
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from proxy import __version__
from proxy.config import TracingConfig
from proxy.flow import Around, C, Call, Check, DoneHook, Exchange, Hooks, Reply
from proxy.ops.metrics import method_label
from proxy.protocol.errors import ProxyError
from proxy.protocol.jsonrpc import MessageKind

log = structlog.get_logger("proxy.ops.tracing")

SLOT: Final = "tracing"  # the exchange's ExchangeTrace, in Exchange.slots
CONTEXT_KEYS: Final = ("traceparent", "tracestate")  # W3C trace context, in headers and in `_meta`
EXPORT_TIMEOUT_SECONDS: Final = 5.0  # one export to the collector
SHUTDOWN_WAIT_SECONDS: Final = 0.5  # at exit: what is queued is sent if the collector answers at once
MAX_NAME_CHARS: Final = 128  # a tool or prompt name, as span names and attributes show it

Attributes = dict[str, AttributeValue]
Forward = Callable[[C, Hooks], Awaitable[Reply]]
Authenticate = Callable[[Exchange], Awaitable[Call]]


@dataclass(eq=False, slots=True)
class ExchangeTrace:
    """One exchange's trace: its start, the events noted before its span opened, then the span."""

    started_ns: int
    events: list[tuple[str, Attributes, int]] = field(default_factory=list)
    span: Span | None = None
    trace_id: str | None = None  # 32 hex digits, for the audit record and the log lines


def _trace(exchange: Exchange) -> ExchangeTrace:
    trace: ExchangeTrace = exchange.slots[SLOT]
    return trace


def note(exchange: Exchange, name: str, attributes: Attributes) -> None:
    """An event of the exchange's span, stamped now (kept until the span opens, if it has not)."""
    trace = _trace(exchange)
    if trace.span is not None:
        trace.span.add_event(name, attributes)
    else:
        trace.events.append((name, attributes, time.time_ns()))


def trace_id_of(exchange: Exchange) -> str | None:
    trace: ExchangeTrace | None = exchange.slots.get(SLOT)
    return trace.trace_id if trace is not None else None


# What an event after a stage says (the outcome so far by default).
_EVENT_ATTRIBUTES: Mapping[str, Callable[[Exchange], Attributes]] = {
    "cache": lambda call: {"mcp_proxy.cache": call.cache_state},
}


def _event_attributes(name: str, call: Exchange) -> Attributes:
    attributes = _EVENT_ATTRIBUTES.get(name)
    return attributes(call) if attributes is not None else {"mcp_proxy.outcome": call.outcome}


def _refusal(error: ProxyError) -> Attributes:
    return {"mcp_proxy.result": "refused", "error.type": str(error.code)}


class _Marked(Around[Any]):
    """An Around stage whose entry is an event of the span (its way out is the stage's own)."""

    def __init__(self, stage: Around[Any], event: str) -> None:
        self.stage = stage
        self.event = event

    async def enter(self, call: Any) -> bool:
        try:
            taken = await self.stage.enter(call)
        except ProxyError as refused:
            note(call, self.event, _refusal(refused))
            raise
        note(call, self.event, _event_attributes(self.event, call))
        return taken

    def leave(self, call: Any, failure: BaseException | None) -> None:
        self.stage.leave(call, failure)


class Tracing:
    """The tracer of one application (its own provider: never the process-wide one) and the steps
    a traced flow adds."""

    def __init__(self, config: TracingConfig) -> None:
        resource = Resource.create({"service.name": config.service_name, "service.version": __version__})
        self.provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
            resource=resource,
            shutdown_on_exit=False,  # shut down with the application, bounded (see shutdown)
        )
        exporter = OTLPSpanExporter(endpoint=config.endpoint, timeout=EXPORT_TIMEOUT_SECONDS)
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("mcp-tenant-proxy", __version__)
        self.propagator = TraceContextTextMapPropagator()
        self.trust_client_context = config.trust_client_context

    # --- the steps a traced flow adds ---------------------------------------------------------------

    async def arrive(self, exchange: Exchange) -> None:
        exchange.slots[SLOT] = ExchangeTrace(time.time_ns())

    def authenticate(self, step: Authenticate) -> Authenticate:
        async def authenticate(exchange: Exchange) -> Call:
            try:
                call = await step(exchange)
            except ProxyError as refused:
                note(exchange, "authentication", _refusal(refused))
                raise
            note(call, "authentication", {"mcp_proxy.result": "ok", "mcp_proxy.tenant": call.ctx.tenant})
            return call

        return authenticate

    async def open_span(self, call: Call) -> None:
        trace = self._open(call, _trace(call))
        structlog.contextvars.bind_contextvars(trace_id=trace.trace_id)

    def event(self, stage: Check[C] | Around[C], name: str | None) -> Check[C] | Around[C]:
        """`stage`, followed by the event `name` (None: the stage as it is)."""
        if name is None:
            return stage
        if isinstance(stage, Around):
            return _Marked(stage, name)
        check = stage

        async def marked(call: C) -> None:
            try:
                await check(call)
            except ProxyError as refused:
                note(call, name, _refusal(refused))
                raise
            note(call, name, _event_attributes(name, call))

        return marked

    def upstream(self, forward: Forward[C]) -> Forward[C]:
        async def traced(call: C, hooks: Hooks) -> Reply:
            server = _trace(call).span
            parent = set_span_in_context(server) if server is not None else Context()
            span = self.tracer.start_span(
                _span_name(call), context=parent, kind=SpanKind.CLIENT, attributes=_call_attributes(call)
            )
            carrier: dict[str, str] = {}
            self.propagator.inject(carrier, context=set_span_in_context(span))
            call.upstream_headers.update(carrier)
            _carry_in_meta(call, carrier)
            if call.tenant.config.upstream.url is not None:  # (a stdio upstream's statuses are the proxy's)

                def answered(status: int) -> None:
                    span.set_attribute("http.response.status_code", status)

                call.on_upstream_status.append(answered)
            try:
                return await forward(call, hooks)
            except ProxyError as error:
                span.set_attribute("error.type", str(error.code))
                raise
            finally:
                if call.upstream_fault:
                    span.set_status(Status(StatusCode.ERROR, "the upstream failed"))
                    if call.error_code is not None:
                        span.set_attribute("error.type", str(call.error_code))
                span.end()

        return traced

    def close(self, exchange: Exchange) -> None:
        """The done hook: the span's last attributes, and its end at the exchange's end."""
        trace: ExchangeTrace | None = exchange.slots.get(SLOT)
        if trace is None or (trace.span is None and exchange.limited is not None):
            return
        span = trace.span if trace.span is not None else self._open(exchange, trace).span
        assert span is not None
        attributes: Attributes = {
            "mcp_proxy.outcome": exchange.outcome,
            "mcp_proxy.cache": exchange.cache_state,
            "http.response.status_code": exchange.status,
        }
        if exchange.session is not None:
            attributes["mcp.session.id"] = exchange.session.audit_id
        if exchange.task_event is not None:
            attributes["mcp_proxy.task_event"] = exchange.task_event
        if exchange.error_code is not None:
            attributes["error.type"] = attributes["rpc.response.status_code"] = str(exchange.error_code)
            span.set_status(Status(StatusCode.ERROR, exchange.outcome))
        span.set_attributes(attributes)
        ended = exchange.ended_at
        span.end(end_time=int(ended * 1e9) if ended is not None else None)

    def naming_trace(self, report: Callable[[Exchange, str | None], None]) -> DoneHook:
        """A report (audit record, log line) that names the exchange's trace."""

        def named(exchange: Exchange) -> None:
            report(exchange, trace_id_of(exchange))

        return named

    # --- spans ---------------------------------------------------------------------------------------

    def _open(self, exchange: Exchange, trace: ExchangeTrace) -> ExchangeTrace:
        span = self.tracer.start_span(
            _span_name(exchange),
            context=self._parent(exchange),
            kind=SpanKind.SERVER,
            attributes=_call_attributes(exchange),
            start_time=trace.started_ns,
        )
        for name, attributes, at in trace.events:
            span.add_event(name, attributes, timestamp=at)
        trace.events.clear()
        trace.span = span
        trace.trace_id = format(span.get_span_context().trace_id, "032x")
        return trace

    def _parent(self, exchange: Exchange) -> Context:
        """The client's trace context when trusted and the client is authenticated; else none."""
        if not self.trust_client_context or exchange.ctx is None:
            return Context()
        carrier: dict[str, str] = {}
        meta = exchange.message.params.get("_meta") if exchange.message is not None else None
        if isinstance(meta, dict) and isinstance(meta.get("traceparent"), str):
            carrier = {key: meta[key] for key in CONTEXT_KEYS if isinstance(meta.get(key), str)}
        else:
            headers = exchange.request.headers
            parents = headers.getall("traceparent", [])
            if len(parents) == 1:  # two would let two readers disagree
                carrier["traceparent"] = parents[0]
                states = headers.getall("tracestate", [])
                if states:
                    carrier["tracestate"] = ",".join(states)
        return self.propagator.extract(carrier, context=Context())

    # --- the provider --------------------------------------------------------------------------------

    def flush(self) -> bool:
        """Export every span ended so far (blocking: call it from a thread)."""
        return self.provider.force_flush()

    async def shutdown(self) -> None:
        """Send what is queued and stop the exporter, waiting at most SHUTDOWN_WAIT_SECONDS: a
        collector that does not answer must not hold up the process's exit."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        def shut_down() -> None:
            try:
                self.provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                    loop.call_soon_threadsafe(finished)

        threading.Thread(target=shut_down, name="trace-export-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(done, SHUTDOWN_WAIT_SECONDS)
        except TimeoutError:
            log.warning("trace_export_unfinished", waited_seconds=SHUTDOWN_WAIT_SECONDS)


def _bounded(name: str) -> str:
    return name[:MAX_NAME_CHARS]


def _span_name(exchange: Exchange) -> str:
    """`{method} {tool or prompt}` (OpenTelemetry's MCP conventions), from names the proxy knows
    or bounds; `{HTTP method} {path}` for what carries no message (GET streams, DELETE)."""
    message = exchange.message
    if message is None:
        return f"{exchange.request.method} {exchange.request.path}"
    method = method_label(message.method)
    name = message.name if message.method in ("tools/call", "prompts/get") else None
    return f"{method} {_bounded(name)}" if name is not None else method


def _call_attributes(exchange: Exchange) -> Attributes:
    attributes: Attributes = {"http.request.method": exchange.request.method}
    if exchange.ctx is not None:
        attributes["mcp_proxy.tenant"] = exchange.ctx.tenant
    if exchange.era is not None:
        attributes["mcp_proxy.era"] = exchange.era.value
    if exchange.protocol_version is not None:
        attributes["mcp.protocol.version"] = exchange.protocol_version
    message = exchange.message
    if message is None:
        return attributes
    attributes["mcp.method.name"] = method_label(message.method)
    if message.id is not None:
        attributes["jsonrpc.request.id"] = _bounded(str(message.id))
    name = message.name
    if name is not None and message.method == "tools/call":
        attributes["gen_ai.tool.name"] = _bounded(name)
    elif name is not None and message.method == "prompts/get":
        attributes["gen_ai.prompt.name"] = _bounded(name)
    return attributes


def _carry_in_meta(call: Call, carrier: Mapping[str, str]) -> None:
    """A request goes upstream with the proxy's trace context in `params._meta` (replacing any
    the client sent: the upstream's trace is the proxy's call, not what the client claims)."""
    message = call.message
    if message is None or message.kind is not MessageKind.REQUEST:
        return
    params = message.body.get("params", {})
    meta = params.get("_meta", {}) if isinstance(params, dict) else None
    if not isinstance(params, dict) or not isinstance(meta, dict):
        return
    kept = {key: value for key, value in meta.items() if key not in CONTEXT_KEYS}
    message.body = {**message.body, "params": {**params, "_meta": {**kept, **carrier}}}
