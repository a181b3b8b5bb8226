"""THREATS I, stdio processes: one tenant cannot flood the host with processes, memory or files.

Every tenant's stdio server runs as the real test server (tests/stdio_server.py), started with a
marker of this test in its argv so the host's process table can be counted independently of the
proxy. Acme's cap (`max_processes`) refuses an initialize beyond it with 429 and starts nothing;
globex's own cap is untouched. Each child runs under its limits; a session's own process stops
when the session idles, whatever the session timeout.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp import MCPError

from proxy.demo import client_for
from proxy.http.keys import RUNTIME, SERVICES
from proxy.upstreams.stdio.upstream import StdioUpstream
from tests.conftest import TENANTS, RunningProxy, StartProxy
from tests.e2e.test_transport_e2e import error_of
from tests.factories import HANDSHAKE_INITIALIZE

pytestmark = pytest.mark.e2e

SERVER = str(Path(__file__).resolve().parent.parent / "stdio_server.py")
MIB = 1024 * 1024


def stdio_tenants(marker: str, **upstream: Any) -> dict[str, Any]:
    return {
        tenant: {"upstream": {"command": [sys.executable, SERVER, tenant, f"{marker}-{tenant}"], **upstream}}
        for tenant in TENANTS
    }


def running_children(marker: str, tenant: str) -> list[int]:
    """Processes on this host whose argv names the tenant's marker (not the proxy's view of them)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().split(") ")[-1][:1]
        except OSError:
            continue
        if f"{marker}-{tenant}".encode() in argv and state != "Z":
            found.append(int(entry.name))
    return found


async def initialize(running: RunningProxy, tenant: str) -> tuple[int, dict[str, str], bytes]:
    return await running.post(HANDSHAKE_INITIALIZE, token=running.token(tenant))


async def test_an_initialize_beyond_the_tenants_process_cap_is_refused_and_starts_nothing(
    make_proxy: StartProxy,
) -> None:
    marker = f"CAP-{secrets.token_hex(4)}"
    running = await make_proxy(
        dict.fromkeys(TENANTS, "http://unused.invalid/mcp"), tenants=stdio_tenants(marker, max_processes=2)
    )
    sessions = []
    for _ in range(2):
        status, headers, _ = await initialize(running, "acme")
        assert status == 200
        sessions.append(headers["Mcp-Session-Id"])
    for _ in range(3):
        status, headers, body = await initialize(running, "acme")
        assert status == 429
        assert error_of(body)["code"] == -32009
        assert int(headers["Retry-After"]) >= 1
    assert len(running_children(marker, "acme")) == 2
    running.app[SERVICES].reports.run_now()
    metrics = running.app[SERVICES].metrics.render().decode()
    assert 'mcp_proxy_limited_total{limit="processes",tenant="acme"} 3.0' in metrics
    assert 'mcp_proxy_requests_total{method="initialize",outcome="denied",tenant="acme"} 3.0' in metrics
    tenant = running.app[RUNTIME].current.tenants.of_tenant("acme")
    assert tenant is not None and isinstance(tenant.upstream, StdioUpstream)
    upstream = tenant.upstream
    assert len(upstream.processes) == 2

    for _ in range(2):  # globex's own cap: acme's processes take nothing from it
        status, _, _ = await initialize(running, "globex")
        assert status == 200
    assert len(running_children(marker, "globex")) == 2

    assert await end_session(running, sessions[0]) == 200  # one session ends, and its process
    deadline = asyncio.get_running_loop().time() + 60  # generous: the machine may be loaded
    while len(upstream.processes) >= 2:
        assert asyncio.get_running_loop().time() < deadline, "the ended session's process never stopped"
        await asyncio.sleep(0.05)
    status, _, _ = await initialize(running, "acme")
    assert status == 200  # its place is free again


async def end_session(running: RunningProxy, session_id: str) -> int:
    import aiohttp

    async with (
        aiohttp.ClientSession() as http,
        http.delete(
            running.url,
            headers={
                "Authorization": f"Bearer {running.token('acme')}",
                "Mcp-Session-Id": session_id,
                "MCP-Protocol-Version": "2025-11-25",
            },
        ) as response,
    ):
        return response.status


@pytest.mark.parametrize("mode", ["legacy", "auto"])  # a session's own process, the shared modern one
async def test_each_child_runs_under_its_resource_limits(make_proxy: StartProxy, mode: str) -> None:
    limits = {"memory_bytes": 512 * MIB, "cpu_seconds": 120, "open_files": 64}
    running = await make_proxy(
        dict.fromkeys(TENANTS, "http://unused.invalid/mcp"),
        tenants=stdio_tenants(f"LIMITS-{secrets.token_hex(4)}", limits=limits),
    )
    async with client_for(running.url, running.token("acme"), mode) as client:
        seen = (await client.call_tool("limits", {})).structured_content
        refused = (await client.call_tool("allocate", {"megabytes": 1024})).structured_content
        held = (await client.call_tool("allocate", {"megabytes": 16})).structured_content
        files = (await client.call_tool("open_files", {"count": 200})).structured_content
    assert seen == {"memory": [512 * MIB, 512 * MIB], "cpu": [120, 125], "files": [64, 64]}
    assert refused == {"result": "refused"}
    assert held == {"result": f"held {16 * MIB}"}
    assert 0 < files["result"] < 64


async def test_the_default_limits_apply_without_configuration(make_proxy: StartProxy) -> None:
    running = await make_proxy(
        dict.fromkeys(TENANTS, "http://unused.invalid/mcp"),
        tenants=stdio_tenants(f"D-{secrets.token_hex(4)}"),
    )
    async with client_for(running.url, running.token("acme"), "legacy") as client:
        seen = (await client.call_tool("limits", {})).structured_content
    assert seen["memory"][0] == 2048 * MIB
    assert seen["cpu"][0] == 3600
    assert seen["files"][0] <= 1024


async def test_an_idle_sessions_own_process_stops_whatever_the_session_timeout(
    make_proxy: StartProxy,
) -> None:
    marker = f"IDLE-{secrets.token_hex(4)}"
    running = await make_proxy(
        dict.fromkeys(TENANTS, "http://unused.invalid/mcp"),
        tenants=stdio_tenants(marker, idle_stop_seconds=1),
        sessions={"idle_timeout_seconds": 600, "max_per_tenant": 100},
    )
    async with client_for(running.url, running.token("acme"), "legacy") as client:
        pid = (await client.call_tool("whoami", {})).structured_content["pid"]
        for _ in range(200):  # the sweep comes round within a second; bounded at 20 s
            if pid not in running_children(marker, "acme"):
                break
            await asyncio.sleep(0.1)
        assert pid not in running_children(marker, "acme")
        with pytest.raises(MCPError):  # the session ended with its process: 404, start anew
            await client.call_tool("whoami", {})
    async with client_for(running.url, running.token("acme"), "legacy") as again:
        assert (await again.call_tool("whoami", {})).structured_content["pid"] != pid
    assert os.getpid() != pid
