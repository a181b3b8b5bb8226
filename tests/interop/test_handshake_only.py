"""A server that speaks only the initialize handshake (server-everything speaks 2025-11-25 at most)
behind the proxy with era bridging off: a 2026-07-28 request gets the unsupported-version error at
once, so SDK clients in their default `auto` mode fall back to initialize; never a 5xx, never a
process started per request, never an open circuit. (Bridged: test_bridging_interop.py.)
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from proxy.demo import client_for
from tests.conftest import StartProxy
from tests.e2e.test_transport_e2e import call_body, modern_body, modern_headers
from tests.interop.conftest import node_package

pytestmark = pytest.mark.e2e

HANDSHAKE_VERSIONS = ["2025-03-26", "2025-06-18", "2025-11-25"]


def text_of(result: Any) -> str:
    return " ".join(getattr(block, "text", "") for block in getattr(result, "content", []))


def counted_everything_stdio(tmp_path: Path) -> tuple[Path, list[str]]:
    """server-everything over stdio as a tenant's command, each start of it counted in a file
    (returned with the command)."""
    server = node_package("@modelcontextprotocol/server-everything")
    starts = tmp_path / "starts"
    script = f"echo started >> {shlex.quote(str(starts))}; exec node {shlex.quote(str(server))} stdio"
    return starts, ["sh", "-c", script]


async def assert_falls_back(url: str, token: str) -> None:
    """The Python SDK client's default mode sends server/discover first and falls back on -32022."""
    async with client_for(url, token, "auto") as client:
        assert client.protocol_version == "2025-11-25"
        assert text_of(await client.call_tool("get-sum", {"a": 2, "b": 3})) == "The sum of 2 and 3 is 5."


async def test_a_modern_request_to_a_handshake_only_stdio_server_starts_nothing_and_opens_no_circuit(
    make_proxy: StartProxy, tmp_path: Path
) -> None:
    starts, command = counted_everything_stdio(tmp_path)
    running = await make_proxy(
        {"acme": "http://unused.invalid/mcp"},
        tenants={"acme": {"upstream": {"command": command}}},
        readiness={"upstreams": "ignore"},  # (a readiness check would start a child of its own)
        bridging={"enabled": False},
    )
    token = running.token("acme")
    for attempt in range(7):  # more than the circuit's five failures
        status, _, raw = await running.post(
            call_body("get-sum", {"a": 1, "b": attempt}, attempt),
            token=token,
            headers=modern_headers("tools/call", "get-sum"),
        )
        answer = json.loads(raw)
        assert status == 400, answer
        assert answer["error"]["code"] == -32022
        assert answer["error"]["data"]["supported"] == HANDSHAKE_VERSIONS
    assert starts.read_text().count("started") == 1  # the one server/discover that learned it
    await assert_falls_back(running.url, token)
    assert starts.read_text().count("started") == 2  # the session's own process, nothing more


async def test_a_modern_request_to_a_handshake_only_http_server_gets_the_unsupported_version_error(
    make_proxy: StartProxy, everything_http: str
) -> None:
    running = await make_proxy({"acme": everything_http}, bridging={"enabled": False})
    token = running.token("acme")
    for request_id in (1, 2):
        status, _, raw = await running.post(
            modern_body("server/discover", request_id=request_id),
            token=token,
            headers=modern_headers("server/discover"),
        )
        answer = json.loads(raw)
        assert (status, answer["error"]["code"]) == (400, -32022), answer
        assert answer["error"]["data"]["supported"] == HANDSHAKE_VERSIONS
    await assert_falls_back(running.url, token)
