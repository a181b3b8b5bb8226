"""Layer 1 end to end: a shared, tenant-aware SDK upstream behind the proxy, driven by the SDK client.

The shared notes server trusts its `tenant_id` argument, as many shared servers do. The proxy's
`tenant_header` tells each recorded upstream request whose it was, so every test can check that
what reached the upstream names only the caller's tenant.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

import pytest
from mcp import MCPError
from mcp.server.mcpserver import MCPServer
from mcp_types import PromptReference, ResourceTemplateReference
from pydantic import Field

from proxy.demo import client_for
from proxy.http.keys import SERVICES
from tests.conftest import TENANTS, RunningProxy, StartProxy
from tests.factories import HANDSHAKE_INITIALIZE
from tests.upstreams import Recorder, free_port

pytestmark = pytest.mark.e2e

POLICY: dict[str, Any] = {
    "tenant_arguments": {
        "names": ["tenant_id", "tenantId", "org_id"],
        "on_mismatch": "reject",
        "hide_from_schema": True,
    },
    "tools": {"allow": ["*"], "deny": ["whoami"]},
    "resources": {"tenant_uri_templates": ["notes://{tenant}/{path}"]},
}


def with_mode(mode: str) -> dict[str, Any]:
    return {**POLICY, "tenant_arguments": {**POLICY["tenant_arguments"], "on_mismatch": mode}}


def text_of(result: Any) -> str:
    return " ".join(getattr(block, "text", "") for block in getattr(result, "content", []))


def tool_calls(recorder: Recorder) -> list[tuple[str, dict[str, Any]]]:
    """(tenant header, params) of every tools/call the upstream received."""
    calls = []
    for record in recorder.snapshot():
        if '"method":"tools/call"' in record.text:
            calls.append((record.headers.get("x-mcp-tenant", ""), json.loads(record.text)["params"]))
    return calls


@pytest.fixture
async def shared_proxy_reject(make_proxy: StartProxy, shared_upstream: Any) -> RunningProxy:
    return await make_proxy(
        dict.fromkeys(TENANTS, shared_upstream.url),
        policies=dict.fromkeys(TENANTS, POLICY),
        tenants={
            t: {"upstream": {"url": shared_upstream.url, "tenant_header": "X-MCP-Tenant"}, "policy": t}
            for t in TENANTS
        },
    )


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_each_tenant_reads_and_writes_only_its_own_notes_on_a_shared_upstream(
    shared_proxy_reject: RunningProxy, shared_upstream: Any, mode: str
) -> None:
    running = shared_proxy_reject
    for tenant in TENANTS:
        async with client_for(running.url, running.token(tenant), mode) as client:
            await client.call_tool("add_note", {"text": f"{tenant}-{mode} plan"})
    for tenant in TENANTS:
        other = next(t for t in TENANTS if t != tenant)
        async with client_for(running.url, running.token(tenant), mode) as client:
            listed = json.loads(text_of(await client.call_tool("list_notes", {})))
            assert listed["tenant_id"] == tenant
            assert f"{tenant}-{mode} plan" in listed["notes"]
            assert not any(other in note for note in listed["notes"])
            with pytest.raises(MCPError) as refused:
                await client.call_tool("list_notes", {"tenant_id": other})
            assert refused.value.error.code == -32005
            assert "tenant_id" in refused.value.error.message
            assert other not in refused.value.error.message
    calls = tool_calls(shared_upstream.recorder)
    assert len(calls) == 4  # the two spoof attempts never arrived
    for tenant_header, params in calls:
        assert params["arguments"]["tenant_id"] == tenant_header


async def test_tenant_arguments_are_hidden_from_tools_list(shared_proxy_reject: RunningProxy) -> None:
    async with client_for(shared_proxy_reject.url, shared_proxy_reject.token("acme")) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        prompts = {prompt.name: prompt for prompt in (await client.list_prompts()).prompts}
    assert "whoami" not in tools  # denied by policy: absent from the list
    for tool in tools.values():
        assert "tenant_id" not in tool.input_schema.get("properties", {})
        assert "tenant_id" not in tool.input_schema.get("required", [])
    assert "text" in tools["add_note"].input_schema["properties"]
    assert [a.name for a in prompts["summarize_notes"].arguments or []] == ["topic"]


async def test_denied_tool_is_refused_without_an_upstream_call(
    shared_proxy_reject: RunningProxy, shared_upstream: Any
) -> None:
    async with client_for(shared_proxy_reject.url, shared_proxy_reject.token("acme")) as client:
        with pytest.raises(MCPError) as refused:
            await client.call_tool("whoami", {})
    assert refused.value.error.code == -32005
    assert "tools.deny" in refused.value.error.message
    assert tool_calls(shared_upstream.recorder) == []


async def test_rewrite_mode_replaces_a_foreign_tenant_and_counts_the_attempt(
    make_proxy: StartProxy, shared_upstream: Any
) -> None:
    running = await make_proxy(
        dict.fromkeys(TENANTS, shared_upstream.url),
        policies={t: with_mode("rewrite") for t in TENANTS},
        tenants={
            t: {"upstream": {"url": shared_upstream.url, "tenant_header": "X-MCP-Tenant"}, "policy": t}
            for t in TENANTS
        },
    )
    async with client_for(running.url, running.token("acme")) as client:
        listed = json.loads(text_of(await client.call_tool("list_notes", {"tenant_id": "globex"})))
        nested = await client.call_tool("add_note", {"text": "x", "tenantId": "globex"})
    assert listed["tenant_id"] == "acme"
    assert not nested.is_error
    for tenant_header, params in tool_calls(shared_upstream.recorder):
        assert tenant_header == "acme"
        assert params["arguments"]["tenant_id"] == "acme"
        assert "globex" not in json.dumps(params)
    running.app[SERVICES].reports.run_now()
    metrics = running.app[SERVICES].metrics.render().decode()
    assert re.search(r'mcp_proxy_spoof_attempts_total\{rule="tenant_arguments",tenant="acme"\} 2\.0', metrics)


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_a_foreign_resource_looks_exactly_like_an_unknown_one(
    shared_proxy_reject: RunningProxy, shared_upstream: Any, mode: str
) -> None:
    async with client_for(shared_proxy_reject.url, shared_proxy_reject.token("acme"), mode) as client:
        own = await client.read_resource("notes://acme/plan")
        assert "note plan of acme" in own.contents[0].text
        with pytest.raises(MCPError) as unknown:
            await client.read_resource("unknown://nothing")
        before = len(shared_upstream.recorder.snapshot())
        for foreign in (
            "notes://globex/plan",
            "notes://acme/../globex/plan",
            "notes://acme/%2e%2e/globex/plan",
        ):
            with pytest.raises(MCPError) as refused:
                await client.read_resource(foreign)
            assert refused.value.error.code == unknown.value.error.code
            # Nothing extra to tell them apart: each names the URI asked for (SEP-2164's data.uri).
            assert unknown.value.error.data == {"uri": "unknown://nothing"}
            assert refused.value.error.data == {"uri": foreign}
            assert refused.value.error.message == unknown.value.error.message.replace(
                "unknown://nothing", foreign
            )
        assert len(shared_upstream.recorder.snapshot()) == before


async def test_prompts_and_completions_name_only_the_caller(
    shared_proxy_reject: RunningProxy, shared_upstream: Any
) -> None:
    async with client_for(shared_proxy_reject.url, shared_proxy_reject.token("acme")) as client:
        prompt = await client.get_prompt("summarize_notes", {"topic": "q3"})
        assert "notes of acme about q3" in prompt.messages[0].content.text
        with pytest.raises(MCPError) as refused:
            await client.get_prompt("summarize_notes", {"tenant_id": "globex"})
        assert refused.value.error.code == -32005
        completion = await client.complete(
            PromptReference(type="ref/prompt", name="summarize_notes"), {"name": "tenant_id", "value": ""}
        )
        assert completion.completion.values == ["acme"]
        template = ResourceTemplateReference(type="ref/resource", uri="notes://globex/{path}")
        with pytest.raises(MCPError):
            await client.complete(template, {"name": "path", "value": ""})
    bodies = " ".join(r.text for r in shared_upstream.recorder.snapshot())
    assert "globex" not in bodies


def tenant_header_server() -> MCPServer:
    server = MCPServer("tenant-header")

    @server.tool()
    def tenant_report(
        tenant_id: Annotated[str, Field(json_schema_extra={"x-mcp-header": "Tenant"})], period: str = "q1"
    ) -> dict[str, Any]:
        """A report whose tenant argument is mirrored in the Mcp-Param-Tenant header."""
        return {"tenant_id": tenant_id, "period": period}

    return server


async def test_mirrored_headers_follow_the_rewritten_body(
    make_proxy: StartProxy, upstream_runner: Any
) -> None:
    recorder = Recorder(tenant_header_server().streamable_http_app(host="127.0.0.1"))
    port = free_port()
    upstream_runner.serve(recorder, port)
    url = f"http://127.0.0.1:{port}/mcp"
    running = await make_proxy(
        dict.fromkeys(TENANTS, url), policies={t: with_mode("rewrite") for t in TENANTS}
    )
    async with client_for(running.url, running.token("acme")) as client:
        listed = (await client.list_tools()).tools
        assert "tenant_id" not in listed[0].input_schema["properties"]
        filled = json.loads(text_of(await client.call_tool("tenant_report", {"period": "q2"})))
        spoofed = json.loads(text_of(await client.call_tool("tenant_report", {"tenant_id": "globex"})))
    assert filled["tenant_id"] == "acme"
    assert spoofed["tenant_id"] == "acme"
    calls = [r for r in recorder.snapshot() if '"method":"tools/call"' in r.text]
    assert len(calls) == 2
    for record in calls:
        assert record.headers["mcp-param-tenant"] == "acme"
        assert json.loads(record.text)["params"]["arguments"]["tenant_id"] == "acme"


async def test_a_mirrored_header_naming_another_tenant_is_refused(
    make_proxy: StartProxy, upstream_runner: Any
) -> None:
    recorder = Recorder(tenant_header_server().streamable_http_app(host="127.0.0.1"))
    port = free_port()
    upstream_runner.serve(recorder, port)
    url = f"http://127.0.0.1:{port}/mcp"
    running = await make_proxy(dict.fromkeys(TENANTS, url), policies=dict.fromkeys(TENANTS, POLICY))
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "tenant_report", "arguments": {"tenant_id": "acme"}, "_meta": meta},
    }
    headers = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": "tenant_report"}
    status, _, answer = await running.post(
        body, token=running.token("acme"), headers={**headers, "Mcp-Param-Tenant": "globex"}
    )
    assert status == 400
    assert json.loads(answer)["error"]["code"] == -32020
    status, _, answer = await running.post(
        body, token=running.token("acme"), headers={**headers, "Mcp-Param-Tenant": "acme"}
    )
    assert status == 200, answer
    assert not [r for r in recorder.snapshot() if "globex" in r.text or "globex" in json.dumps(r.headers)]


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"list_notes",'
            b'"arguments":{"tenant_id":"acme","tenant_id":"globex"}}}',
            -32700,
        ),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"list_notes","arguments":'
            + b"[" * 100_000
            + b"]" * 100_000
            + b"}}",
            -32700,
        ),
    ],
    ids=["duplicate keys", "100k-deep nesting"],
)
async def test_body_tricks_never_reach_the_upstream(
    shared_proxy_reject: RunningProxy, shared_upstream: Any, raw: bytes, code: int
) -> None:
    session = await _handshake(shared_proxy_reject)
    status, _, answer = await shared_proxy_reject.post(
        None,
        raw=raw,
        token=shared_proxy_reject.token("acme"),
        headers={"Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"},
    )
    assert status == 400
    assert json.loads(answer)["error"]["code"] == code
    assert tool_calls(shared_upstream.recorder) == []


async def _handshake(running: RunningProxy) -> str:
    status, headers, _ = await running.post(HANDSHAKE_INITIALIZE, token=running.token("acme"))
    assert status == 200
    return headers["Mcp-Session-Id"]
