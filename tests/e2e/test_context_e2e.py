"""Layer 4 end to end: audit files, proxy_recent_activity, and MRTR requestState bound to its caller."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mcp import MCPError
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import InputRequiredResult

from proxy.demo import client_for
from proxy.transport import SERVICES
from tests.conftest import TENANTS, RunningProxy, StartProxy
from tests.upstreams import Recorder, free_port

pytestmark = pytest.mark.e2e

ACTIVITY_POLICY = {
    "tenant_arguments": {"names": ["tenant_id"], "on_mismatch": "reject", "hide_from_schema": False},
    "recent_activity": {"enabled": True, "max_records": 10},
}


def text_of(result: Any) -> str:
    return " ".join(getattr(block, "text", "") for block in getattr(result, "content", []))


@pytest.fixture
async def audited(upstreams: dict[str, Any], make_proxy: StartProxy, tmp_path: Path) -> RunningProxy:
    return await make_proxy(
        upstreams, policies=dict.fromkeys(TENANTS, ACTIVITY_POLICY), audit={"dir": str(tmp_path / "audit")}
    )


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_audit_files_hold_summaries_of_their_own_tenant_only(
    audited: RunningProxy, upstreams: dict[str, Any], tmp_path: Path, mode: str
) -> None:
    tokens = {tenant: audited.token(tenant) for tenant in TENANTS}
    for tenant in TENANTS:
        async with client_for(audited.url, tokens[tenant], mode) as client:
            await client.call_tool("add_note", {"tenant_id": tenant, "text": f"SECRET-{tenant}-VALUE"})
            await client.call_tool("list_notes", {"tenant_id": tenant})
            await client.read_resource(f"notes://{tenant}/only-{tenant}")
            with pytest.raises(MCPError):
                await client.call_tool("list_notes", {"tenant_id": "someone-else"})
    audited.app[SERVICES].audit.flush()
    for tenant in TENANTS:
        other = next(t for t in TENANTS if t != tenant)
        path = tmp_path / "audit" / f"{tenant}.jsonl"
        text = path.read_text()
        records = [json.loads(line) for line in text.splitlines()]
        assert {r["tenant"] for r in records} == {tenant}
        methods = [r["method"] for r in records]
        assert "tools/call" in methods
        assert "resources/read" in methods
        assert any(r["outcome"] == "spoof" for r in records)
        for forbidden in (f"SECRET-{tenant}-VALUE", upstreams[tenant].canary, upstreams[other].canary,
                          tokens[tenant], tokens[other], other, "someone-else"):  # fmt: skip
            assert forbidden not in text
        answered = [r for r in records if r["method"] == "tools/call" and r["outcome"] == "ok"]
        assert all(r["result_bytes"] > 0 and len(r["result_sha256"]) == 64 for r in answered)
        assert path.stat().st_mode & 0o777 == 0o600


async def test_recent_activity_returns_only_the_callers_tenant(audited: RunningProxy) -> None:
    for tenant in TENANTS:
        async with client_for(audited.url, audited.token(tenant)) as client:
            await client.call_tool("whoami", {})
            await client.read_resource(f"notes://{tenant}/diary-of-{tenant}")
    for tenant in TENANTS:
        other = next(t for t in TENANTS if t != tenant)
        async with client_for(audited.url, audited.token(tenant)) as client:
            tools = {tool.name for tool in (await client.list_tools()).tools}
            assert "proxy_recent_activity" in tools
            result = await client.call_tool("proxy_recent_activity", {"limit": 10})
        records = result.structured_content["records"]
        assert records
        assert any(r["name"] == f"notes://{tenant}/diary-of-{tenant}" for r in records)
        assert other not in json.dumps(records)
        assert other not in text_of(result)


async def test_recent_activity_is_off_unless_the_policy_enables_it(proxy: RunningProxy) -> None:
    async with client_for(proxy.url, proxy.token("acme")) as client:
        tools = {tool.name for tool in (await client.list_tools()).tools}
    assert "proxy_recent_activity" not in tools


def asking_server() -> MCPServer:
    server = MCPServer("asking")

    @server.tool()
    async def confirm(ctx: Context) -> InputRequiredResult | str:
        """Asks for a second round before answering."""
        if ctx.request_state is None:
            return InputRequiredResult(request_state="round-two")
        return f"confirmed after {ctx.request_state}"

    return server


META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}
HEADERS = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": "confirm"}


async def test_request_state_round_trips_only_for_its_caller(
    make_proxy: StartProxy, upstream_runner: Any
) -> None:
    recorder = Recorder(asking_server().streamable_http_app(host="127.0.0.1"))
    port = free_port()
    upstream_runner.serve(recorder, port)
    running = await make_proxy(dict.fromkeys(TENANTS, f"http://127.0.0.1:{port}/mcp"))
    async with client_for(running.url, running.token("acme")) as client:
        result = await client.call_tool("confirm", {})
    assert "confirmed after" in text_of(result)

    first = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "confirm", "_meta": META}}
    status, _, raw = await running.post(first, token=running.token("acme", "alice"), headers=HEADERS)
    assert status == 200
    issued = json.loads(raw)["result"]
    assert issued["resultType"] == "input_required"
    sealed = issued["requestState"]
    assert sealed.startswith("mtp1.")
    upstream_states = [
        json.loads(r.text)["result"]["requestState"] for r in [] if r
    ]  # the proxy never shows it
    assert upstream_states == []
    before = len(recorder.snapshot())
    retry = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
             "params": {"name": "confirm", "requestState": sealed, "_meta": META}}  # fmt: skip
    for thief in (running.token("globex", "alice"), running.token("acme", "mallory")):
        status, _, raw = await running.post(retry, token=thief, headers=HEADERS)
        assert status == 400
        error = json.loads(raw)["error"]
        assert error["code"] == -32602
        assert "requestState" in error["message"]
    assert len(recorder.snapshot()) == before  # refused before any upstream call
    status, _, raw = await running.post(retry, token=running.token("acme", "alice"), headers=HEADERS)
    assert status == 200
    assert "confirmed after" in raw.decode()
    forwarded = json.loads(recorder.snapshot()[-1].text)["params"]["requestState"]
    assert not forwarded.startswith("mtp1.")  # the upstream got its own state back
