"""Tenant templates end to end: one template serving many tenants, each on its own upstream (a real
SDK stdio process per tenant, or a shared SDK server told the tenant in its URL and headers);
explicit entries and claim conditions deciding which configuration serves a token; the allowlist
file read again on reload; a template tenant built on its first request and dropped when idle."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.app import drop_idle_tenants
from proxy.config import load_config
from proxy.demo import client_for
from proxy.http.keys import RUNTIME, SERVICES
from proxy.http.server import start_server
from proxy.ops.reload import reload_config
from tests.conftest import MCP_ACCEPT, RunningProxy, StartProxy, proxy_config
from tests.e2e.test_stdio_e2e import SERVER, exited, structured
from tests.factories import DEV_SECRET, DEV_SECRET_ENV, HANDSHAKE_INITIALIZE
from tests.upstreams import free_port

pytestmark = pytest.mark.e2e

MODERN = "2026-07-28"
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientCapabilities": {},
}
STDIO_TEMPLATE = {
    "match": "team-[0-9]+",
    "upstream": {
        "command": [sys.executable, SERVER, "{tenant}", "STDIO-CANARY-{tenant}"],
        "isolation": "per_tenant",
    },
}


def tool_call(name: str, arguments: dict[str, Any] | None = None, request_id: int = 1) -> dict[str, Any]:
    params = {"name": name, "arguments": arguments or {}, "_meta": MODERN_META}
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


async def call(
    running: RunningProxy, tenant: str, name: str, arguments: dict[str, Any] | None = None, **claims: Any
) -> tuple[int, dict[str, Any]]:
    headers = {"MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": name}
    status, answered, body = await running.post(
        tool_call(name, arguments), token=running.token(tenant, **claims), headers=headers
    )
    if answered.get("Content-Type", "").startswith("text/event-stream"):  # the answer is the last event
        body = [line for line in body.splitlines() if line.startswith(b"data:")][-1][5:]
    return status, json.loads(body)


def tool_result(answer: dict[str, Any]) -> dict[str, Any]:
    assert "result" in answer, answer
    result: dict[str, Any] = answer["result"]["structuredContent"]
    return result


def holding(runtime: Any, key: tuple[str, int]) -> bool:
    tenant = runtime.tenants.built(key)
    return tenant is not None and bool(tenant.usage.in_use)


def posts(upstream: Any) -> int:
    return sum(1 for r in upstream.recorder.snapshot() if r.method == "POST")


async def test_one_template_serves_each_tenant_its_own_process_and_refuses_the_rest(
    make_proxy: StartProxy,
) -> None:
    running = await make_proxy({}, tenants={}, tenant_templates=[STDIO_TEMPLATE])
    tenants = running.app[RUNTIME].current.tenants
    assert len(tenants) == 0  # nothing is built before a tenant's first request
    pids = {}
    for tenant in ("team-1", "team-22"):
        async with client_for(running.url, running.token(tenant)) as client:
            who = structured(await client.call_tool("whoami", {}))
            assert (who["server_tenant"], who["canary"]) == (tenant, f"STDIO-CANARY-{tenant}")
            pids[tenant] = who["pid"]
            await client.call_tool("add_note", {"tenant_id": tenant, "text": f"secret of {tenant}"})
    assert len(set(pids.values())) == 2
    for outsider in ("team-x", "acme", "xteam-1"):
        status, answer = await call(running, outsider, "whoami")
        assert status == 403, answer
        assert answer["error"]["code"] == -32003
    assert sorted(t.id for t in tenants) == ["team-1", "team-22"]  # a refused id builds nothing


async def test_explicit_entries_win_and_claims_choose_the_template(
    make_proxy: StartProxy, upstreams: dict[str, Any], shared_upstream: Any
) -> None:
    templates = [
        {"match": ".*", "claims": {"plan": "pro"}, "upstream": {"url": upstreams["globex"].url}},
        {
            "match": "[a-z]+",
            "upstream": {"url": shared_upstream.url + "?org={tenant}", "headers": {"X-Org": "org-{tenant}"}},
        },
    ]
    running = await make_proxy({"acme": upstreams["acme"]}, tenant_templates=templates)
    # acme has its own entry: a pro token of acme still reaches acme's own upstream.
    status, answer = await call(running, "acme", "whoami", plan="pro")
    assert (status, tool_result(answer)["canary"]) == (200, upstreams["acme"].canary)
    # initech has none: the shared server, told the tenant in the URL and a header.
    status, answer = await call(running, "initech", "request_headers")
    assert status == 200, answer
    assert tool_result(answer)["headers"]["x-org"] == "org-initech"
    assert tool_result(answer)["canary"] == shared_upstream.canary
    assert {r.query for r in shared_upstream.recorder.snapshot()} == {"org=initech"}
    # The same tenant with a pro token: the first template, whose conditions now hold.
    status, answer = await call(running, "initech", "whoami", plan="pro")
    assert (status, tool_result(answer)["canary"]) == (200, upstreams["globex"].canary)
    # A free token of an id the second template does not match: no template, 403, no upstream call.
    before = posts(shared_upstream) + posts(upstreams["globex"])
    status, answer = await call(running, "initech2", "whoami", plan="free")
    assert status == 403, answer
    assert posts(shared_upstream) + posts(upstreams["globex"]) == before


async def test_the_allowlist_file_closes_the_id_space_and_is_read_again_on_reload(
    shared_upstream: Any, tmp_path: Path, rsa_keys: Any
) -> None:
    listed = tmp_path / "tenants.txt"
    listed.write_text("team-1\n")
    url = f"http://127.0.0.1:{free_port()}/mcp"
    data = proxy_config(url, {}, tmp_path, rsa_keys, reload={"watch_files": False}, tenants={})
    data["tenant_templates"] = [{"match": "team-.*", "upstream": {"url": shared_upstream.url}}]
    data["tenant_allowlist"] = {"file": str(listed)}
    path = tmp_path / "proxy.yaml"
    path.write_text(json.dumps(data))
    runner, _ = await start_server(load_config(path, env={**os.environ, DEV_SECRET_ENV: DEV_SECRET}))
    running = RunningProxy(url, None, runner.app)
    try:
        assert (await call(running, "team-1", "whoami"))[0] == 200
        assert (await call(running, "team-2", "whoami"))[0] == 403
        assert posts(shared_upstream) == 1
        listed.write_text("# team-1 left\nteam-2\n")
        assert await reload_config(runner.app)
        assert (await call(running, "team-2", "whoami"))[0] == 200
        status, answer = await call(running, "team-1", "whoami")
        assert status == 403, answer
        assert posts(shared_upstream) == 2
        listed.write_text("team-2\nnot an id\n")  # a bad file: the reload is refused, nothing changes
        assert not await reload_config(runner.app)
        assert (await call(running, "team-2", "whoami"))[0] == 200
    finally:
        await runner.cleanup()


async def test_an_idle_template_tenant_leaves_memory_and_comes_back_on_its_next_request(
    make_proxy: StartProxy, shared_upstream: Any
) -> None:
    template = {"match": "team-[0-9]+", "upstream": {"url": shared_upstream.url}, "idle_seconds": 60}
    lab = {**STDIO_TEMPLATE, "match": "lab-1"}
    running = await make_proxy({}, tenants={}, tenant_templates=[template, lab])
    runtime, services = running.app[RUNTIME].current, running.app[SERVICES]
    later = time.monotonic() + 3600  # as the sweep sees it an hour later

    slow = asyncio.create_task(call(running, "team-1", "countdown", {"n": 2, "delay": 0.3}))
    while not holding(runtime, ("team-1", 0)):  # the call has reached the upstream
        await asyncio.sleep(0.01)
    first = runtime.tenants.built(("team-1", 0))
    await drop_idle_tenants(runtime, services, later)
    assert runtime.tenants.built(("team-1", 0)) is first  # a request in flight holds it
    assert (await slow)[0] == 200

    # A handshake-era session holds its tenant too, until it ends.
    headers = {"Authorization": f"Bearer {running.token('team-2')}", "Accept": MCP_ACCEPT}
    async with aiohttp.ClientSession() as http:
        async with http.post(running.url, json=HANDSHAKE_INITIALIZE, headers=headers) as opened:
            assert opened.status == 200
            session = opened.headers["Mcp-Session-Id"]
        status, answer = await call(running, "lab-1", "whoami")
        pid = tool_result(answer)["pid"]
        await drop_idle_tenants(runtime, services, later)
        assert sorted(t.id for t in runtime.tenants) == ["team-2"]  # team-1 and lab-1 were idle
        assert await exited(pid)  # lab-1's process ended with it
        metrics = (await (await http.get(running.metrics_url)).read()).decode()
        assert 'tenant="team-1"' not in metrics and 'tenant="lab-1"' not in metrics
        assert 'tenant="team-2"' in metrics
        assert await services.audit.recent("team-1", 10) == []
        session_headers = {**headers, "Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"}
        async with http.delete(running.url, headers=session_headers) as ended:
            assert ended.status == 200
    await drop_idle_tenants(runtime, services, later)
    assert len(runtime.tenants) == 0

    status, answer = await call(running, "team-1", "whoami")  # built again, on a new upstream
    assert (status, tool_result(answer)["canary"]) == (200, shared_upstream.canary)
    again = runtime.tenants.built(("team-1", 0))
    assert again is not None and first is not None
    assert again is not first and again.upstream is not first.upstream
