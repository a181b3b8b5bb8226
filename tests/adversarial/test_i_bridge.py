"""THREATS I through the era bridge: what one caller declares about itself (capabilities, clientInfo)
can neither multiply its share of the upstream sessions the proxy holds for a tenant, nor take
colleagues' sessions away, nor fill the shared Redis for every tenant."""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest
import redis.asyncio as redis_asyncio

from proxy.bridge.declared import MAX_DECLARED_BYTES
from tests.conftest import RunningProxy, StartProxy
from tests.e2e.test_bridging_e2e import bodies, deleted, handshake_only, upstream
from tests.e2e.test_bridging_reverse_e2e import calls, stateless, stateless_server
from tests.e2e.test_scaleout_e2e import redis_server
from tests.e2e.test_transport_e2e import HANDSHAKE, call_body, modern_headers, session_headers
from tests.redis_server import RedisServer

pytestmark = pytest.mark.e2e
__all__ = ["handshake_only", "redis_server", "stateless", "stateless_server", "upstream"]

CAPABILITIES = "io.modelcontextprotocol/clientCapabilities"
CLIENT_INFO = "io.modelcontextprotocol/clientInfo"


def answer_of(raw: bytes) -> dict[str, Any]:
    """The JSON-RPC answer of a POST, sent as JSON or as the last data line of an SSE stream."""
    if raw.lstrip().startswith(b"{"):
        return dict(json.loads(raw))
    data = [line[5:] for line in raw.decode().splitlines() if line.startswith("data:")]
    answers = [json.loads(d) for d in data if d.strip() and "id" in json.loads(d)]
    return dict(answers[-1])


async def call_as(
    running: RunningProxy, token: str, tool: str, arguments: dict[str, Any], capabilities: dict[str, Any]
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """A 2026-07-28 tools/call declaring `capabilities` in its _meta."""
    body = call_body(tool, arguments)
    body["params"]["_meta"] = {**body["params"]["_meta"], CAPABILITIES: capabilities}
    status, headers, raw = await running.post(body, token=token, headers=modern_headers("tools/call", tool))
    return status, headers, answer_of(raw)


def memory_of(answer: dict[str, Any]) -> list[str]:
    return list(answer["result"]["structuredContent"]["memory"])


# Five sets of client capabilities that change what the proxy forwards (all with elicitation, so an
# ask_user call waits upstream for the client's answer: its held session stays in use).
DISTINCT: list[dict[str, Any]] = [
    {"elicitation": {}},
    {"elicitation": {"form": {}}},
    {"elicitation": {"form": {}, "url": {}}},
    {"elicitation": {}, "sampling": {}},
    {"elicitation": {"form": {}}, "sampling": {}},
]


async def test_made_up_capabilities_open_no_session_and_end_no_colleagues(
    make_proxy: StartProxy, upstream: Any
) -> None:
    running = await make_proxy({"acme": upstream}, bridging={"max_sessions_per_tenant": 5})
    alice, bob = running.token("acme", sub="alice"), running.token("acme", sub="bob")
    assert (await call_as(running, bob, "remember", {"text": "bob-state"}, {}))[0] == 200
    for i in range(6):
        made_up = {"elicitation": {"x": i}, "experimental": {f"x{i}": {}}, f"madeUp{i}": {}}
        status, _, answer = await call_as(running, alice, "recall", {}, made_up)
        assert status == 200, answer
    _, _, answer = await call_as(running, bob, "recall", {}, {})
    assert memory_of(answer) == ["bob-state"]  # bob's upstream session lived on
    initializes = [message for _, message in bodies(upstream, "initialize")]
    assert len(initializes) == 2  # one session for bob, one for alice
    assert [m["params"]["capabilities"] for m in initializes] == [{}, {"elicitation": {}}]
    assert deleted(upstream) == []


async def test_a_caller_holds_at_most_its_share_and_colleagues_are_served(
    make_proxy: StartProxy, upstream: Any
) -> None:
    running = await make_proxy({"acme": upstream}, bridging={"max_sessions_per_tenant": 5})
    alice = running.token("acme", sub="alice")
    for capabilities in DISTINCT[:4]:  # four of alice's sessions, each waiting for her answer
        status, _, answer = await call_as(running, alice, "ask_user", {"topic": "attic"}, capabilities)
        assert (status, answer.get("result", {}).get("resultType")) == (200, "input_required"), answer
    status, headers, answer = await call_as(running, alice, "ask_user", {"topic": "attic"}, DISTINCT[4])
    assert (status, answer["error"]["code"]) == (429, -32009)
    assert answer["error"]["data"] == {"limit": "bridged_sessions_per_caller"}
    assert headers["Retry-After"]
    assert (await call_as(running, alice, "whoami", {}, DISTINCT[0]))[0] == 200  # her own still serve her
    for colleague in ("bob", "carol"):  # the tenant's fifth session, then its room for another caller
        status, _, answer = await call_as(running, running.token("acme", sub=colleague), "whoami", {}, {})
        assert status == 200, answer
    assert len(bodies(upstream, "initialize")) == 6


async def test_a_callers_new_sessions_end_its_own_idle_ones_never_a_colleagues(
    make_proxy: StartProxy, upstream: Any
) -> None:
    running = await make_proxy({"acme": upstream}, bridging={"max_sessions_per_tenant": 3})
    alice, bob = running.token("acme", sub="alice"), running.token("acme", sub="bob")
    assert (await call_as(running, bob, "remember", {"text": "bob-state"}, {}))[0] == 200
    for capabilities in DISTINCT:  # one after the other: each of alice's is idle when the next comes
        assert (await call_as(running, alice, "whoami", {}, capabilities))[0] == 200
    _, _, answer = await call_as(running, bob, "recall", {}, {})
    assert memory_of(answer) == ["bob-state"]
    ((bob_session, _),) = [
        call for call in bodies(upstream, "tools/call") if call[1]["params"]["name"] == "remember"
    ]
    assert bob_session not in deleted(upstream)
    assert len(deleted(upstream)) == len(DISTINCT) - 2  # alice keeps two (fewer than the tenant's three)


# --- a handshake client of a 2026-07-28 upstream without sessions: what its session record holds --


async def initialize_raw(
    running: RunningProxy, token: str, params: dict[str, Any]
) -> tuple[int, dict[str, str], dict[str, Any]]:
    body = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {"protocolVersion": HANDSHAKE, **params},
    }
    status, headers, raw = await running.post(body, token=token)
    return status, headers, answer_of(raw)


async def stored(url: str, prefix: str) -> dict[bytes, int]:
    """Each Redis key under `prefix` and the bytes Redis uses for it."""
    client = redis_asyncio.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        return {key: int(await client.memory_usage(key) or 0) for key in keys}
    finally:
        await client.aclose()


async def test_a_handshake_clients_declarations_are_kept_bounded_in_redis(
    make_proxy: StartProxy, stateless: Any, redis_server: RedisServer
) -> None:
    prefix = f"t{secrets.token_hex(4)}"
    running = await make_proxy(
        {"acme": stateless}, state={"backend": "redis", "url": redis_server.url, "key_prefix": prefix}
    )
    token = running.token("acme", sub="mallory")
    blob = "A" * 1_500_000
    status, headers, answer = await initialize_raw(
        running,
        token,
        {
            "capabilities": {"experimental": {"x": {"blob": blob}}, "elicitation": {}, "madeUp": {"b": blob}},
            "clientInfo": {"name": "atk", "version": "1", "description": blob[:100_000]},
        },
    )
    assert (status, "result" in answer) == (200, True), answer
    session = headers["Mcp-Session-Id"]
    usage = await stored(redis_server.url, prefix)
    assert usage and max(usage.values()) < 4 * MAX_DECLARED_BYTES, usage  # was 4 MB, twice
    whoami = {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {"name": "whoami", "arguments": {}},
    }
    status, _, _ = await running.post(whoami, token=token, headers=session_headers(session))
    assert status == 200
    ((_, message),) = calls(stateless, "whoami")
    meta = message["params"]["_meta"]
    assert meta[CAPABILITIES] == {"elicitation": {}}
    assert meta[CLIENT_INFO] == {"name": "atk", "version": "1"}
    # more than the proxy keeps: refused before any upstream call, nothing stored
    stateless.recorder.clear()
    status, headers, answer = await initialize_raw(
        running, token, {"capabilities": {}, "clientInfo": {"name": "n" * MAX_DECLARED_BYTES, "version": "1"}}
    )
    assert (status, answer["error"]["code"]) == (200, -32602)
    assert "Mcp-Session-Id" not in headers
    assert stateless.recorder.snapshot() == []
    assert set(await stored(redis_server.url, prefix)) == set(usage)
    # a log level is one MCP defines, or refused (the proxy keeps it per session)
    set_level = {"jsonrpc": "2.0", "id": 3, "method": "logging/setLevel", "params": {"level": "x" * 100_000}}
    status, _, raw = await running.post(set_level, token=token, headers=session_headers(session))
    assert (status, answer_of(raw)["error"]["code"]) == (200, -32602)
