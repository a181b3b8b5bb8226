"""Era bridging with real SDK peers: the Python SDK client pinned to 2026-07-28 served by a 2025-era
(handshake-only) SDK server through the upstream sessions the proxy holds for each caller.

Each test asserts on what the upstream itself received (its recorder): which session each call
ran on, what the session was initialized with, what was answered and cancelled on it.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mcp.shared.exceptions import MCPError
from mcp_types import ElicitResult

from proxy.config import load_config
from proxy.demo import client_for
from proxy.http.keys import SERVICES
from proxy.http.server import start_server
from proxy.ops.reload import reload_config
from tests.conftest import MCP_ACCEPT, RunningProxy, StartProxy, proxy_config
from tests.e2e.test_transport_e2e import call_body, modern_body, modern_headers, sse_messages
from tests.era_upstreams import start_handshake_only_upstream
from tests.factories import DEV_SECRET, DEV_SECRET_ENV
from tests.upstreams import TOOL_EVENTS, Recorded, free_port

pytestmark = pytest.mark.e2e

MODERN = "2026-07-28"


@pytest.fixture(scope="module")
def handshake_only(upstream_runner: Any) -> Any:
    return start_handshake_only_upstream(upstream_runner, "acme", f"CANARY-acme-{secrets.token_hex(4)}")


@pytest.fixture
def upstream(handshake_only: Any) -> Any:
    handshake_only.recorder.clear()
    return handshake_only


def text_of(result: Any) -> str:
    return " ".join(getattr(block, "text", "") for block in getattr(result, "content", []))


def received(upstream: Any) -> list[Recorded]:
    """What the upstream got on sessions (its era probes, 2026-07-28 requests it refused, left out)."""
    return [r for r in upstream.recorder.requests if r.headers.get("mcp-protocol-version") != MODERN]


def bodies(upstream: Any, method: str | None = None) -> list[tuple[str | None, dict[str, Any]]]:
    """(upstream session id, JSON-RPC message) of each POST the upstream got, of `method` if given."""
    found = []
    for record in received(upstream):
        if record.method == "POST" and record.body:
            message = json.loads(record.text)
            if method is None or message.get("method") == method:
                found.append((record.headers.get("mcp-session-id"), message))
    return found


def deleted(upstream: Any) -> list[str]:
    return [r.headers.get("mcp-session-id", "") for r in received(upstream) if r.method == "DELETE"]


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return predicate()


async def pick_teal(context: Any, params: Any) -> ElicitResult:
    return ElicitResult(action="accept", content={"colour": "teal"})


async def test_a_2026_client_lists_calls_reads_and_gets_prompts_on_a_handshake_only_server(
    make_proxy: StartProxy, upstream: Any
) -> None:
    running = await make_proxy({"acme": upstream})
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    async with client_for(running.url, running.token("acme"), MODERN) as client:
        assert client.protocol_version == MODERN
        assert "whoami" in [tool.name for tool in (await client.list_tools()).tools]
        assert upstream.canary in text_of(await client.call_tool("whoami", {}))
        done = await client.call_tool("countdown", {"n": 3, "delay": 0.01}, progress_callback=on_progress)
        resource = await client.read_resource("notes://acme/first")
        prompt = await client.get_prompt("summarize_notes", {"tenant_id": "acme", "topic": "tides"})
    assert json.loads(text_of(done))["done"] == 3
    assert progress == [1, 2, 3]
    assert upstream.canary in resource.contents[0].text
    assert resource.result_type == "complete"
    assert upstream.canary in prompt.messages[0].content.text
    (initialize,) = bodies(upstream, "initialize")
    assert initialize[1]["params"]["protocolVersion"] == "2025-11-25"
    sessions = {session for session, _ in bodies(upstream)} - {None}
    assert len(sessions) == 1  # one session held for this caller, every call on it
    assert [m["params"]["name"] for _, m in bodies(upstream, "tools/call")] == ["whoami", "countdown"]


async def test_an_elicitation_during_a_call_is_answered_through_an_input_required_round(
    make_proxy: StartProxy, upstream: Any
) -> None:
    running = await make_proxy({"acme": upstream})
    async with client_for(
        running.url, running.token("acme"), MODERN, elicitation_callback=pick_teal
    ) as client:
        result = await client.call_tool("ask_user", {"topic": "kitchen"})
    assert json.loads(text_of(result)) == {"topic": "kitchen", "colour": "teal", "canary": upstream.canary}
    (initialize,) = bodies(upstream, "initialize")
    assert "elicitation" in initialize[1]["params"]["capabilities"]  # the caller's, from its _meta
    (call,) = bodies(upstream, "tools/call")  # the call ran once: the retry continued it
    answers = [(session, m) for session, m in bodies(upstream) if "method" not in m]
    assert [m["result"]["content"] for _, m in answers] == [{"colour": "teal"}]
    assert answers[0][0] == call[0]  # the answer went back on the call's own session


async def test_log_messages_reach_a_2026_client_only_as_it_asked_for_them(
    make_proxy: StartProxy, upstream: Any
) -> None:
    running = await make_proxy({"acme": upstream})
    logged: list[Any] = []

    async def on_log(params: Any) -> None:
        logged.append(params.data)

    token = running.token("acme")
    async with client_for(running.url, token, MODERN, logging_callback=on_log, log_level="info") as client:
        await client.call_tool("announce", {"marker": "asked"})
    async with client_for(running.url, token, MODERN, logging_callback=on_log) as client:
        await client.call_tool("announce", {"marker": "not-asked"})
    assert logged == ["request-log asked"]  # the call's own, as opted in; never the session's


async def test_what_cannot_be_bridged_is_refused_with_a_clear_error(
    make_proxy: StartProxy, upstream: Any
) -> None:
    running = await make_proxy({"acme": upstream})
    body = modern_body("tasks/get", {"taskId": "t-1"})
    status, _, raw = await running.post(
        body, token=running.token("acme"), headers=modern_headers("tasks/get", "t-1")
    )
    error = json.loads(raw)["error"]
    assert (status, error["code"]) == (404, -32601)
    assert "not bridged" in error["message"]
    assert bodies(upstream) == []


async def input_required(running: RunningProxy, token: str, topic: str) -> dict[str, Any]:
    body = call_body("ask_user", {"topic": topic})
    body["params"]["_meta"]["io.modelcontextprotocol/clientCapabilities"] = {"elicitation": {}}
    status, _, raw = await running.post(body, token=token, headers=modern_headers("tools/call", "ask_user"))
    assert status == 200
    (answer,) = [m for m in _sse(raw) if "id" in m]
    return dict(answer["result"])


def _sse(raw: bytes) -> list[dict[str, Any]]:
    text = raw.decode()
    if not text.lstrip().startswith(("data:", "event:", ":")):
        return [json.loads(text)]
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]


async def retry(
    running: RunningProxy, token: str, topic: str, state: str, key: str
) -> tuple[int, dict[str, Any]]:
    body = call_body("ask_user", {"topic": topic}, request_id=2)
    body["params"]["_meta"]["io.modelcontextprotocol/clientCapabilities"] = {"elicitation": {}}
    body["params"]["requestState"] = state
    body["params"]["inputResponses"] = {key: {"action": "accept", "content": {"colour": "plum"}}}
    status, _, raw = await running.post(body, token=token, headers=modern_headers("tools/call", "ask_user"))
    (answer,) = [m for m in _sse(raw) if "id" in m]
    return status, answer


async def test_a_waiting_call_goes_on_only_for_the_caller_it_was_sealed_to(
    make_proxy: StartProxy, upstream: Any
) -> None:
    running = await make_proxy({"acme": upstream})
    alice, bob = running.token("acme", sub="alice"), running.token("acme", sub="bob")
    result = await input_required(running, alice, "hall")
    assert result["resultType"] == "input_required"
    (key,) = result["inputRequests"]
    assert result["inputRequests"][key]["method"] == "elicitation/create"
    assert result["requestState"].startswith("mtp2.")  # sealed to alice: the bridge's own state inside
    status, refused = await retry(running, bob, "hall", result["requestState"], key)
    assert (status, refused["error"]["code"]) == (400, -32602)
    status, answered = await retry(running, alice, "hall", result["requestState"], key)
    assert status == 200
    assert answered["result"]["structuredContent"]["colour"] == "plum"
    assert answered["result"]["resultType"] == "complete"
    status, again = await retry(running, alice, "hall", result["requestState"], key)
    assert (status, again["error"]["code"]) == (400, -32602)  # the call is done: nothing waits any more


async def test_two_users_of_one_tenant_never_share_an_upstream_session(
    make_proxy: StartProxy, upstream: Any
) -> None:
    running = await make_proxy({"acme": upstream})
    canaries = {user: f"CANARY-{user}-{secrets.token_hex(4)}" for user in ("alice", "bob")}

    async def use(user: str) -> list[str]:
        async with client_for(running.url, running.token("acme", sub=user), MODERN) as client:
            await client.call_tool("remember", {"text": canaries[user]})
            return list(json.loads(text_of(await client.call_tool("recall", {})))["memory"])

    memories = dict(zip(canaries, await asyncio.gather(use("alice"), use("bob")), strict=True))
    assert memories == {"alice": [canaries["alice"]], "bob": [canaries["bob"]]}
    calls = bodies(upstream, "tools/call")
    session_of = {
        m["params"]["arguments"]["text"]: session
        for session, m in calls
        if "text" in m["params"]["arguments"]
    }
    assert session_of[canaries["alice"]] != session_of[canaries["bob"]]
    assert len(bodies(upstream, "initialize")) == 2
    # a third client of alice's, with other capabilities, gets a session of its own
    async with client_for(
        running.url, running.token("acme", sub="alice"), MODERN, elicitation_callback=pick_teal
    ) as client:
        assert json.loads(text_of(await client.call_tool("recall", {})))["memory"] == []
    assert len(bodies(upstream, "initialize")) == 3


async def test_closing_the_2026_request_cancels_the_call_upstream(
    make_proxy: StartProxy, upstream: Any
) -> None:
    running = await make_proxy({"acme": upstream})
    tag = secrets.token_hex(6)
    body = call_body("watched_countdown", {"tag": tag, "n": 50, "delay": 0.1})
    body["params"]["_meta"]["progressToken"] = "p-1"
    headers = {
        "Authorization": f"Bearer {running.token('acme')}",
        "Accept": MCP_ACCEPT,
        "Content-Type": "application/json",
        **modern_headers("tools/call", "watched_countdown"),
    }
    async with aiohttp.ClientSession() as http:
        response = await http.post(running.url, data=json.dumps(body), headers=headers)
        first = await anext(sse_messages(response))
        assert first["method"] == "notifications/progress"
        assert first["params"]["progressToken"] == "p-1"  # the caller's own token again
        response.close()
    events = TOOL_EVENTS.setdefault(tag, [])
    assert await wait_for(lambda: "cancelled" in events), events
    assert "finished" not in events
    (call,) = bodies(upstream, "tools/call")
    assert await wait_for(lambda: bool(bodies(upstream, "notifications/cancelled")))
    (cancelled,) = bodies(upstream, "notifications/cancelled")
    assert cancelled[1]["params"]["requestId"] == call[1]["id"]
    assert cancelled[0] == call[0]


async def test_held_sessions_are_capped_per_tenant_and_end_when_idle(
    make_proxy: StartProxy, upstream: Any
) -> None:
    running = await make_proxy(
        {"acme": upstream}, bridging={"max_sessions_per_tenant": 1, "idle_seconds": 0.5}
    )
    headers = modern_headers("tools/call", "whoami")
    alice, bob = running.token("acme", sub="alice"), running.token("acme", sub="bob")
    assert (await running.post(call_body("whoami", {}), token=alice, headers=headers))[0] == 200
    # bob's session needs room: alice's idle one is ended for it
    assert (await running.post(call_body("whoami", {}), token=bob, headers=headers))[0] == 200
    (alice_session, bob_session) = [s for s, _ in bodies(upstream, "tools/call")]
    assert await wait_for(lambda: deleted(upstream) == [alice_session])
    # while bob's is busy, alice cannot have one
    slow = call_body("countdown", {"n": 5, "delay": 0.1})
    busy = asyncio.create_task(
        running.post(slow, token=bob, headers=modern_headers("tools/call", "countdown"))
    )
    assert await wait_for(lambda: len(bodies(upstream, "tools/call")) == 3)
    status, response_headers, raw = await running.post(call_body("whoami", {}), token=alice, headers=headers)
    assert (status, json.loads(raw)["error"]["code"]) == (429, -32009)
    assert response_headers["Retry-After"]
    assert (await busy)[0] == 200
    # idle for bridging.idle_seconds: ended upstream
    assert await wait_for(lambda: deleted(upstream) == [alice_session, bob_session])


async def test_with_bridging_off_a_2026_request_gets_the_unsupported_version_error(
    make_proxy: StartProxy, upstream: Any
) -> None:
    running = await make_proxy({"acme": upstream}, bridging={"enabled": False})
    status, _, raw = await running.post(
        modern_body("tools/list"), token=running.token("acme"), headers=modern_headers("tools/list")
    )
    error = json.loads(raw)["error"]
    assert (status, error["code"]) == (400, -32022)
    assert error["data"]["supported"] == ["2025-03-26", "2025-06-18", "2025-11-25"]
    assert bodies(upstream) == []


async def test_the_policy_the_cache_and_the_audit_apply_to_bridged_calls(
    make_proxy: StartProxy, upstream: Any, tmp_path: Path
) -> None:
    policy = {
        "tenant_arguments": {"names": ["tenant_id"], "on_mismatch": "reject", "hide_from_schema": True},
        "client_capabilities": {"elicitation": "deny"},
        "tools": {"cache_ttl_seconds": {"whoami": 60}},
    }
    running = await make_proxy(
        {"acme": upstream}, policies={"acme": policy}, audit={"dir": str(tmp_path / "audit")}
    )
    async with client_for(
        running.url, running.token("acme"), MODERN, elicitation_callback=pick_teal
    ) as client:
        listed = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert "tenant_id" not in json.dumps(listed["add_note"].input_schema)  # hidden, as unbridged
        added = json.loads(text_of(await client.call_tool("add_note", {"text": "bridged"})))
        with pytest.raises(MCPError) as refused:
            await client.call_tool("add_note", {"text": "x", "tenant_id": "globex"})
        first = text_of(await client.call_tool("whoami", {}))
        assert text_of(await client.call_tool("whoami", {})) == first
        with pytest.raises(MCPError) as denied:
            await client.call_tool("ask_user", {"topic": "attic"})
    assert added["tenant_id"] == "acme"  # filled in from the token
    assert refused.value.error.code == -32005
    # elicitation: deny kept the capability from the upstream, which refused to ask (as unbridged)
    assert denied.value.error.code == -32021
    assert "elicitation" not in bodies(upstream, "initialize")[-1][1]["params"]["capabilities"]
    names = [m["params"]["name"] for _, m in bodies(upstream, "tools/call")]
    assert names.count("whoami") == 1  # the second answer came from the tenant's cache
    assert "globex" not in json.dumps(bodies(upstream))
    running.app[SERVICES].flush()
    records = [json.loads(line) for line in (tmp_path / "audit" / "acme.jsonl").read_text().splitlines()]
    calls = [r for r in records if r.get("method") == "tools/call"]
    assert {r["cache"] for r in calls if r.get("name") == "whoami"} == {"miss", "hit"}


async def test_a_reload_and_the_shutdown_end_the_held_sessions(
    upstream: Any, tmp_path: Path, rsa_keys: Any
) -> None:
    url = f"http://127.0.0.1:{free_port()}/mcp"
    data = proxy_config(url, {"acme": upstream}, tmp_path, rsa_keys, reload={"watch_files": False})
    path = tmp_path / "proxy.yaml"
    path.write_text(json.dumps(data))
    runner, _ = await start_server(load_config(path, env={**os.environ, DEV_SECRET_ENV: DEV_SECRET}))
    running = RunningProxy(url, None, runner.app)
    headers = modern_headers("tools/call", "whoami")
    try:
        assert (await running.post(call_body("whoami", {}), token=running.token("acme"), headers=headers))[
            0
        ] == 200
        data["sessions"] = {"idle_timeout_seconds": 600}
        path.write_text(json.dumps(data))
        assert await asyncio.wait_for(reload_config(runner.app), 5)
        (first,) = {s for s, _ in bodies(upstream, "tools/call")}
        assert await wait_for(lambda: deleted(upstream) == [first])
        assert (await running.post(call_body("whoami", {}), token=running.token("acme"), headers=headers))[
            0
        ] == 200
    finally:
        await runner.cleanup()
    second = [s for s, _ in bodies(upstream, "tools/call")][-1]
    assert second != first
    assert deleted(upstream) == [first, second]
