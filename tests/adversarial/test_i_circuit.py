"""THREATS I, the circuit breaker: one user cannot shut the tenant out by going away.

The tenant's circuit opens after `circuit_failures` (here 2) consecutive failures of the upstream
itself. Clients that cancel or abandon their calls (both eras, SDK clients and raw HTTP, stdio and
HTTP upstreams), requests the upstream refuses (4xx, JSON-RPC errors) and policy denials must never
count: after more of them than the threshold, another user of the tenant is still served, and
every cancelled call is audited with outcome `cancelled`. Upstream faults still count (control).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.demo import client_for
from proxy.http.keys import SERVICES
from proxy.layers.limits.limiter import TenantLimits
from tests.conftest import MCP_ACCEPT, TENANTS, RunningProxy, StartProxy
from tests.e2e.test_transport_e2e import call_body, modern_headers, sse_messages
from tests.upstreams import free_port

pytestmark = pytest.mark.e2e

SERVER = str(Path(__file__).resolve().parent.parent / "stdio_server.py")
LIMITS = {"circuit_failures": 2, "circuit_open_seconds": 60}
ATTEMPTS = 4  # twice the threshold


def stdio_tenants() -> dict[str, Any]:
    return {
        tenant: {"upstream": {"command": [sys.executable, SERVER, tenant, f"STDIO-CANARY-{tenant}"]}}
        for tenant in TENANTS
    }


async def stdio_proxy(make_proxy: StartProxy, tmp_path: Path, **overrides: Any) -> RunningProxy:
    return await make_proxy(
        dict.fromkeys(TENANTS, "http://unused.invalid/mcp"),
        tenants=stdio_tenants(),
        limits=LIMITS,
        audit={"dir": str(tmp_path / "audit")},
        **overrides,
    )


def breaker(running: RunningProxy, tenant: str = "acme") -> TenantLimits:
    runtime = running.app[SERVICES].limiter
    settings = running.config.limits_of(running.config.tenants[tenant])
    return runtime.of(tenant, settings)


def outcomes(running: RunningProxy, tool: str, tenant: str = "acme") -> list[str]:
    running.app[SERVICES].flush()
    path = Path(running.config.audit.dir or "") / f"{tenant}.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["outcome"] for r in records if r.get("name") == tool]


async def assert_still_served(running: RunningProxy, mode: str = "auto") -> None:
    """Another user of the tenant: the circuit is closed and the upstream answers."""
    assert breaker(running).breaker.failures == 0
    assert not breaker(running).breaker.is_open
    async with client_for(running.url, running.token("acme", "bob"), mode) as bob:
        who = await bob.call_tool("whoami", {})
    assert who.structured_content["server_tenant"] == "acme"


async def sdk_cancelled_slow_call(running: RunningProxy, mode: str, tag: str) -> None:
    """An SDK call cancelled once the server has started it (its log message arrived)."""
    started = asyncio.Event()

    async def on_log(params: Any) -> None:
        if f"slow {tag} started" in str(params.data):
            started.set()

    async with client_for(
        running.url, running.token("acme", "alice"), mode, log_level="debug", logging_callback=on_log
    ) as client:
        call = asyncio.create_task(client.call_tool("slow", {"tag": tag, "seconds": 30}))
        await asyncio.wait_for(started.wait(), 20)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_sdk_clients_cancelling_calls_never_open_the_circuit(
    make_proxy: StartProxy, tmp_path: Path, mode: str
) -> None:
    running = await stdio_proxy(make_proxy, tmp_path)
    for attempt in range(ATTEMPTS):
        await sdk_cancelled_slow_call(running, mode, f"{mode}-{attempt}")
    await assert_still_served(running)
    assert outcomes(running, "slow") == ["cancelled"] * ATTEMPTS


async def abandoned_modern_call(running: RunningProxy, tool: str, arguments: dict[str, Any]) -> None:
    """A raw 2026-07-28 call whose client goes away after the first event of its stream."""
    body = call_body(tool, arguments)
    body["params"]["_meta"]["io.modelcontextprotocol/logLevel"] = "debug"
    body["params"]["_meta"]["progressToken"] = "p"
    headers = {
        "Accept": MCP_ACCEPT,
        "Content-Type": "application/json",
        "Authorization": f"Bearer {running.token('acme', 'alice')}",
        **modern_headers("tools/call", tool),
    }
    async with aiohttp.ClientSession() as http:
        response = await http.post(running.url, data=json.dumps(body), headers=headers)
        try:
            assert response.status == 200
            first = await asyncio.wait_for(anext(sse_messages(response)), 20)
            assert first["method"].startswith("notifications/")
        finally:
            response.close()


async def test_raw_modern_clients_abandoning_streams_never_open_the_circuit(
    make_proxy: StartProxy, tmp_path: Path
) -> None:
    running = await stdio_proxy(make_proxy, tmp_path)
    for attempt in range(ATTEMPTS):
        await abandoned_modern_call(running, "slow", {"tag": f"raw-{attempt}", "seconds": 30})
    deadline = asyncio.get_running_loop().time() + 60  # (the closed connections' handlers run to their end)
    while len(outcomes(running, "slow")) < ATTEMPTS and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    await assert_still_served(running)
    assert outcomes(running, "slow") == ["cancelled"] * ATTEMPTS


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_cancellations_on_an_http_upstream_never_open_the_circuit(
    make_proxy: StartProxy, upstreams: dict[str, Any], tmp_path: Path, mode: str
) -> None:
    running = await make_proxy(upstreams, limits=LIMITS, audit={"dir": str(tmp_path / "audit")})
    for attempt in range(ATTEMPTS):
        progressed = asyncio.Event()

        async def on_progress(
            value: float, total: float | None, message: str | None, progressed: asyncio.Event = progressed
        ) -> None:
            progressed.set()

        async with client_for(running.url, running.token("acme", "alice"), mode) as client:
            call = asyncio.create_task(
                client.call_tool(
                    "watched_countdown",
                    {"tag": f"http-{mode}-{attempt}", "n": 200, "delay": 0.05},
                    progress_callback=on_progress,
                )
            )
            await asyncio.wait_for(progressed.wait(), 20)
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call
    await assert_still_served(running)
    assert outcomes(running, "watched_countdown") == ["cancelled"] * ATTEMPTS


# --- answers the upstream gave, and refusals of the proxy's own, are not failures -----------------


async def refusing_upstream(stack: contextlib.AsyncExitStack) -> str:
    """An upstream that answers every call, but never with a result: 400, 404 and JSON-RPC errors."""
    answers = iter(
        [
            (400, {"jsonrpc": "2.0", "id": 1, "error": {"code": -32022, "message": "Unsupported version"}}),
            (200, {"jsonrpc": "2.0", "id": 1, "error": {"code": -32602, "message": "Unknown tool"}}),
            (422, {"jsonrpc": "2.0", "id": 1, "error": {"code": -32600, "message": "No"}}),
        ]
        * ATTEMPTS
    )

    async def handle(request: web.Request) -> web.Response:
        message = await request.json()
        if message["method"] == "server/discover":  # (the proxy's era probe: a 2026-07-28 server)
            result = {"supportedVersions": ["2026-07-28"], "capabilities": {}, "resultType": "complete"}
            return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": result})
        if message["method"] == "tools/list":  # (the proxy learns the tenant's tools for its policy)
            tools = [{"name": name, "inputSchema": {"type": "object"}} for name in ("whoami", "forbidden")]
            return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": {"tools": tools}})
        status, body = next(answers)
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_post("/mcp", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return f"http://127.0.0.1:{port}/mcp"


async def test_upstream_refusals_errors_and_policy_denials_never_open_the_circuit(
    make_proxy: StartProxy, upstreams: dict[str, Any]
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        running = await make_proxy(
            {"acme": await refusing_upstream(stack), "globex": upstreams["globex"]},
            policies={"acme": {"tools": {"deny": ["forbidden"]}}},
            limits=LIMITS,
        )
        statuses = []
        for _ in range(3 * ATTEMPTS):
            status, _, _ = await running.post(
                call_body("whoami", {}), token=running.token(), headers=modern_headers("tools/call", "whoami")
            )
            statuses.append(status)
        for _ in range(ATTEMPTS):
            status, _, _ = await running.post(
                call_body("forbidden", {}),
                token=running.token(),
                headers=modern_headers("tools/call", "forbidden"),
            )
            statuses.append(status)
        assert 502 not in statuses and 503 not in statuses, statuses
        assert breaker(running).breaker.failures == 0


async def test_the_upstreams_own_faults_still_open_the_circuit(make_proxy: StartProxy) -> None:
    """The control: a dead upstream opens it after the threshold, and only for its tenant."""
    running = await make_proxy({"acme": f"http://127.0.0.1:{free_port()}/mcp", "globex": "http://x/"},
                               limits=LIMITS)  # fmt: skip
    statuses = []
    for _ in range(3):
        status, _, _ = await running.post(
            call_body("whoami", {}), token=running.token(), headers=modern_headers("tools/call", "whoami")
        )
        statuses.append(status)
    assert statuses == [502, 502, 503]
    assert breaker(running).breaker.is_open


async def test_one_users_timeouts_never_shut_the_tenants_other_users_out(
    make_proxy: StartProxy, upstreams: dict[str, Any]
) -> None:
    """A caller chooses how long its call runs (a long search, an export): timeouts of one user's
    calls do not open the tenant's circuit; timeouts of two users' calls do (the control)."""
    slow_upstream = {"url": upstreams["acme"].url, "read_timeout_seconds": 0.3}
    running = await make_proxy(
        {"acme": upstreams["acme"].url, "globex": upstreams["globex"].url},
        tenants={"acme": {"upstream": slow_upstream}},
        limits=LIMITS,
    )
    slow = call_body("countdown", {"n": 1, "delay": 3})
    headers = modern_headers("tools/call", "countdown")

    async def timed_out(sub: str) -> None:
        status, _, answer = await running.post(slow, token=running.token(sub=sub), headers=headers)
        assert b"-32011" in answer, (status, answer)

    for _ in range(ATTEMPTS):
        await timed_out("mallory")
    assert not breaker(running).breaker.is_open
    whoami = call_body("whoami", {})
    status, _, answer = await running.post(
        whoami, token=running.token(sub="bob"), headers=modern_headers("tools/call", "whoami")
    )
    assert status == 200 and b"-32012" not in answer, answer
    await timed_out("mallory")
    await timed_out("carol")  # another user's call times out as well: the upstream is slow for all
    assert breaker(running).breaker.is_open
