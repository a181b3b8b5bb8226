"""Traces (tracing.enabled), end to end: a real SDK upstream behind, an OTLP/HTTP collector on
loopback in front of the exporter (an aiohttp app that decodes what it receives with
opentelemetry-proto), raw MCP requests from the test.

What is pinned: one exchange is one SERVER span with its events, the upstream call one CLIENT span
under it, and the upstream receives exactly that span's context (header and `_meta`); a client's
trace context is ignored unless trusted, and then continued; the audit record and the request's
log line name the trace; names only, never argument values or tokens, in what is exported.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from proxy.config import ConfigError, ProxyConfig, TracingConfig
from proxy.http.keys import SERVICES
from proxy.ops.reload import _check_fixed
from tests.conftest import RunningProxy, StartProxy
from tests.e2e.test_transport_e2e import META, call_body, error_of, modern_headers
from tests.factories import config_dict
from tests.upstreams import free_port

pytestmark = pytest.mark.e2e

SERVER, CLIENT = Span.SpanKind.SPAN_KIND_SERVER, Span.SpanKind.SPAN_KIND_CLIENT
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "00f067aa0ba902b7"
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


@dataclass
class Collector:
    """An OTLP/HTTP traces endpoint: every span it was sent, as protobuf messages."""

    url: str = ""
    spans: list[Span] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        self.bodies.append(body)
        for resource_spans in export.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    received = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", received.receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    received.url = f"http://127.0.0.1:{port}/v1/traces"
    try:
        yield received
    finally:
        await runner.cleanup()


async def traced_proxy(
    make_proxy: StartProxy, upstreams: dict[str, Any], collector: Collector, **tracing: Any
) -> RunningProxy:
    return await make_proxy(upstreams, tracing={"enabled": True, "endpoint": collector.url, **tracing})


async def exported(running: RunningProxy, collector: Collector) -> list[Span]:
    """Every span of the exchanges answered so far, once the collector has them."""
    services = running.app[SERVICES]
    services.flush()  # the reports (the span's end among them) run
    assert services.tracing is not None
    assert await asyncio.to_thread(services.tracing.flush)  # (the exporter calls back into this loop)
    return collector.spans


def attributes(span: Span) -> dict[str, Any]:
    return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}


def one(spans: list[Span], kind: int) -> Span:
    found = [span for span in spans if span.kind == kind]
    assert len(found) == 1, [(s.name, s.kind) for s in spans]
    return found[0]


def upstream_calls(upstream: Any, method: str = "tools/call") -> list[tuple[dict[str, str], dict[str, Any]]]:
    """(headers, body) of each POST of `method` the upstream received."""
    calls = []
    for recorded in upstream.recorder.snapshot():
        if recorded.method == "POST" and json.loads(recorded.text).get("method") == method:
            calls.append((recorded.headers, json.loads(recorded.text)))
    return calls


def trace_and_parent(traceparent: str) -> tuple[str, str]:
    version, trace_id, parent_id, _flags = traceparent.split("-")
    assert version == "00"
    return trace_id, parent_id


async def add_note(running: RunningProxy, text: str, **headers: str) -> tuple[int, bytes]:
    body = call_body("add_note", {"tenant_id": "acme", "text": text})
    body["params"]["_meta"] = {**META, "traceparent": CLIENT_TRACEPARENT}
    token = running.token("acme")
    status, _, answer = await running.post(
        body, token=token, headers=modern_headers("tools/call", "add_note", **headers)
    )
    return status, answer


# --- one exchange, one trace ------------------------------------------------------------------------


async def test_a_call_is_one_trace_from_the_client_to_the_upstream(
    make_proxy: StartProxy, upstreams: dict[str, Any], collector: Collector
) -> None:
    running = await traced_proxy(make_proxy, upstreams, collector)
    argument = f"ARGUMENT-{secrets.token_hex(6)}"
    with structlog.testing.capture_logs() as logs:
        status, answer = await add_note(running, argument)
        assert status == 200, answer
        spans = await exported(running, collector)

    server, client = one(spans, SERVER), one(spans, CLIENT)
    assert server.name == client.name == "tools/call add_note"
    assert client.trace_id == server.trace_id and client.parent_span_id == server.span_id
    assert not server.parent_span_id  # a new trace: the client's context is not trusted by default
    assert server.start_time_unix_nano <= client.start_time_unix_nano
    assert client.end_time_unix_nano <= server.end_time_unix_nano
    assert [event.name for event in server.events] == ["authentication", "policy", "cache"]
    stamps = [event.time_unix_nano for event in server.events]
    assert server.start_time_unix_nano <= stamps[0] <= stamps[1] <= stamps[2] <= client.start_time_unix_nano
    expected = {
        "mcp_proxy.tenant": "acme",
        "mcp.method.name": "tools/call",
        "gen_ai.tool.name": "add_note",
        "mcp_proxy.outcome": "ok",
        "mcp_proxy.cache": "bypass",
        "mcp_proxy.era": "modern",
        "http.response.status_code": 200,
    }
    assert {key: attributes(server).get(key) for key in expected} == expected
    assert attributes(client)["http.response.status_code"] == 200

    # The upstream request carries the client span's context, in its header and in `_meta`.
    [(headers, body)] = upstream_calls(upstreams["acme"])
    trace_id, parent_id = trace_and_parent(headers["traceparent"])
    assert (trace_id, parent_id) == (server.trace_id.hex(), client.span_id.hex())
    assert body["params"]["_meta"]["traceparent"] == headers["traceparent"]

    # Names only: no argument value and no token in anything exported.
    exported_bytes = b"".join(collector.bodies)
    assert argument.encode() not in exported_bytes
    assert running.token("acme").split(".")[2].encode() not in exported_bytes

    # The audit record and the request's log line name the trace.
    [record] = await running.app[SERVICES].audit.recent("acme", 10)
    assert record["trace_id"] == server.trace_id.hex()
    [line] = [line for line in logs if line.get("event") == "mcp_request"]
    assert line["trace_id"] == server.trace_id.hex()


async def test_a_refused_call_is_traced_with_its_refusal_and_nothing_goes_upstream(
    make_proxy: StartProxy, upstreams: dict[str, Any], collector: Collector
) -> None:
    running = await make_proxy(
        upstreams,
        policies={"acme": {"tools": {"allow": ["whoami"]}}},
        tracing={"enabled": True, "endpoint": collector.url},
    )
    status, answer = await add_note(running, "denied")
    assert status == 200 and error_of(answer)["code"] == -32005
    spans = await exported(running, collector)
    server = one(spans, SERVER)
    assert not [span for span in spans if span.kind == CLIENT]
    assert not upstream_calls(upstreams["acme"])
    policy = [event for event in server.events if event.name == "policy"]
    assert len(policy) == 1
    assert {a.key: a.value.string_value for a in policy[0].attributes}["error.type"] == "-32005"
    assert attributes(server)["mcp_proxy.outcome"] == "denied"
    assert attributes(server)["error.type"] == "-32005"
    assert server.status.code == server.status.STATUS_CODE_ERROR
    [record] = await running.app[SERVICES].audit.recent("acme", 10)
    assert record["trace_id"] == server.trace_id.hex()


# --- whose trace ----------------------------------------------------------------------------------


async def call_with_client_context(running: RunningProxy, carrier: str) -> None:
    """acme's whoami carrying the client's own trace context in `_meta` or in a header."""
    body = call_body("whoami", {})
    headers = modern_headers("tools/call", "whoami")
    if carrier == "meta":
        body["params"]["_meta"] = {**META, "traceparent": CLIENT_TRACEPARENT}
    else:
        headers["traceparent"] = CLIENT_TRACEPARENT
    status, _, answer = await running.post(body, token=running.token("acme"), headers=headers)
    assert status == 200, answer


@pytest.mark.parametrize("carrier", ["meta", "header"])
async def test_a_client_trace_context_is_ignored_unless_trusted(
    make_proxy: StartProxy, upstreams: dict[str, Any], collector: Collector, carrier: str
) -> None:
    running = await traced_proxy(make_proxy, upstreams, collector)
    await call_with_client_context(running, carrier)
    server = one(await exported(running, collector), SERVER)
    assert server.trace_id.hex() != CLIENT_TRACE and not server.parent_span_id
    [(upstream_headers, upstream_body)] = upstream_calls(upstreams["acme"])
    for sent in (upstream_headers["traceparent"], upstream_body["params"]["_meta"]["traceparent"]):
        assert trace_and_parent(sent)[0] == server.trace_id.hex()  # the proxy's trace, not the client's


@pytest.mark.parametrize("carrier", ["meta", "header"])
async def test_a_trusted_client_trace_context_is_continued(
    make_proxy: StartProxy, upstreams: dict[str, Any], collector: Collector, carrier: str
) -> None:
    running = await traced_proxy(make_proxy, upstreams, collector, trust_client_context=True)
    await call_with_client_context(running, carrier)
    spans = await exported(running, collector)
    server, client = one(spans, SERVER), one(spans, CLIENT)
    assert (server.trace_id.hex(), server.parent_span_id.hex()) == (CLIENT_TRACE, CLIENT_SPAN)
    [(upstream_headers, upstream_body)] = upstream_calls(upstreams["acme"])
    assert trace_and_parent(upstream_headers["traceparent"]) == (CLIENT_TRACE, client.span_id.hex())
    assert upstream_body["params"]["_meta"]["traceparent"] == upstream_headers["traceparent"]


async def test_an_unauthenticated_request_never_joins_the_trace_it_names(
    make_proxy: StartProxy, upstreams: dict[str, Any], collector: Collector
) -> None:
    running = await traced_proxy(make_proxy, upstreams, collector, trust_client_context=True)
    status, _, _ = await running.post(
        call_body("whoami", {}),
        headers={**modern_headers("tools/call", "whoami"), "traceparent": CLIENT_TRACEPARENT},
    )
    assert status == 401
    server = one(await exported(running, collector), SERVER)
    assert server.trace_id.hex() != CLIENT_TRACE and not server.parent_span_id
    assert [event.name for event in server.events] == ["authentication"]


# --- off, and the config -----------------------------------------------------------------------------


def test_without_tracing_opentelemetry_is_never_imported() -> None:
    """The default config builds the application without importing OpenTelemetry at all."""
    script = (
        "import sys\n"
        "from tests.factories import make_config\n"
        "from proxy.app import create_app\n"
        "create_app(make_config())\n"
        "print(sorted(name for name in sys.modules if name.startswith('opentelemetry')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]", done.stdout


def test_tracing_needs_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"mcp-tenant-proxy\[tracing\]"):
        TracingConfig(enabled=True)
    assert not TracingConfig().enabled  # off by default, installed or not


def test_changing_tracing_needs_a_restart() -> None:
    before = ProxyConfig.model_validate(config_dict({"acme": "http://127.0.0.1:9/mcp"}), context={})
    after = before.model_copy(update={"tracing": TracingConfig(enabled=True)})
    with pytest.raises(ConfigError, match=r"tracing.*restart"):
        _check_fixed(before, after)


# --- what the upstream is told --------------------------------------------------------------------

CLIENT_BAGGAGE = "tenant=globex"


@pytest.mark.parametrize("tracing", ["off", "on", "trusted"])
@pytest.mark.parametrize("era", ["2026-07-28", "handshake"])
async def test_a_client_trace_context_and_baggage_in_meta_never_reach_the_upstream(
    make_proxy: StartProxy, upstreams: dict[str, Any], collector: Collector, tracing: str, era: str
) -> None:
    """SDK servers extract `_meta` with the default propagators: a client's baggage (`tenant=...`)
    would reach every service behind a shared upstream, its trace context would choose the trace
    the upstream's work joins. Only the proxy's own traceparent goes upstream (with tracing on)."""
    if tracing == "off":
        running = await make_proxy(upstreams)
    else:
        trusted = tracing == "trusted"
        running = await traced_proxy(make_proxy, upstreams, collector, trust_client_context=trusted)
    token = running.token("acme")
    body = call_body("whoami", {})
    client_meta = {"traceparent": CLIENT_TRACEPARENT, "tracestate": "k=v", "baggage": CLIENT_BAGGAGE}
    if era == "handshake":
        from tests.e2e.test_transport_e2e import initialize, session_headers

        headers = session_headers(await initialize(running, token))
        body["params"]["_meta"] = client_meta
    else:
        headers = modern_headers("tools/call", "whoami")
        body["params"]["_meta"] = {**META, **client_meta}
    status, _, answer = await running.post(body, token=token, headers=headers)
    assert status == 200, answer
    [(_, upstream_body)] = upstream_calls(upstreams["acme"])
    meta = upstream_body["params"].get("_meta", {})
    assert "baggage" not in meta
    assert meta.get("traceparent") != CLIENT_TRACEPARENT
    # (A trusted client's trace is continued: its tracestate goes with it, as W3C prescribes.)
    assert ("tracestate" in meta) == (tracing == "trusted")
    assert ("traceparent" in meta) == (tracing != "off")
