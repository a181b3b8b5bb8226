"""Real clients and servers from npm against the tenant's circuit breaker (THREATS I).

- The TypeScript SDK client (1.32.2, handshake era) aborts calls of a stdio upstream's slow tool:
  it sends notifications/cancelled and the server ends the call without an answer. More
  cancellations than the circuit's threshold leave the circuit closed, and each call is audited
  as cancelled.
- server-everything over stdio speaks only the handshake era: modern-era requests get -32022 with
  the versions it speaks (an SDK client in auto mode then falls back to initialize), not 502s that
  would open the tenant's circuit.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from proxy.demo import client_for
from tests.adversarial.test_i_circuit import (
    ATTEMPTS,
    LIMITS,
    assert_still_served,
    breaker,
    outcomes,
    stdio_proxy,
)
from tests.conftest import TENANTS, StartProxy
from tests.e2e.test_transport_e2e import call_body, error_of, modern_headers
from tests.interop.conftest import MODULES, node_package

pytestmark = pytest.mark.e2e

CANCEL_SCRIPT = Path(__file__).parent / "cancel_calls.mjs"


async def test_the_typescript_client_aborting_calls_never_opens_the_circuit(
    make_proxy: StartProxy, tmp_path: Path
) -> None:
    node_package("@modelcontextprotocol/sdk", "package.json")
    running = await stdio_proxy(make_proxy, tmp_path)
    env = {
        "PATH": os.environ["PATH"],
        "NODE_PATH": str(MODULES),
        "MCP_URL": running.url,
        "MCP_TOKEN": running.token("acme", "alice"),
        "ATTEMPTS": str(ATTEMPTS),
    }
    process = await asyncio.create_subprocess_exec(
        "node", str(CANCEL_SCRIPT), env=env, cwd=str(Path(__file__).parent),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode == 0, stderr.decode()
    report = json.loads(stdout.decode().strip().splitlines()[-1])
    assert report["outcomes"] == ["aborted"] * ATTEMPTS
    assert report["who"]["server_tenant"] == "acme"  # the same client carries on
    await assert_still_served(running, "legacy")
    assert outcomes(running, "slow") == ["cancelled"] * ATTEMPTS


async def test_a_handshake_only_stdio_server_refuses_the_modern_era_without_opening_the_circuit(
    make_proxy: StartProxy,
) -> None:
    server = node_package("@modelcontextprotocol/server-everything")
    running = await make_proxy(
        dict.fromkeys(TENANTS, "http://unused.invalid/mcp"),
        tenants={t: {"upstream": {"command": ["node", str(server), "stdio"]}} for t in TENANTS},
        limits=LIMITS,
        bridging={"enabled": False},  # (bridged, the modern era is served: test_bridging_interop.py)
    )
    answers = []
    for _ in range(3 * ATTEMPTS):
        status, _, body = await running.post(
            call_body("echo", {"message": "hi"}),
            token=running.token(),
            headers=modern_headers("tools/call", "echo"),
        )
        answers.append((status, error_of(body)["code"]))
    assert answers == [(400, -32022)] * (3 * ATTEMPTS)
    assert "2025-11-25" in error_of(body)["data"]["supported"]
    assert breaker(running).breaker.failures == 0
    async with client_for(running.url, running.token("acme", "bob"), "auto") as client:  # falls back
        echoed: Any = await client.call_tool("echo", {"message": "still served"})
    assert "still served" in echoed.content[0].text
