"""Era bridging the other way: the Python SDK client in mode="legacy" (initialize, a session, server
requests on its streams) served by a stateless 2026-07-28 SDK server, which keeps no sessions and so
has no back channel in the handshake era. The proxy keeps the session itself and sends each request
statelessly, its _meta built from the session's initialize.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from typing import Any

import pytest

from proxy.demo import client_for
from tests.conftest import StartProxy
from tests.e2e.test_bridging_e2e import pick_teal, text_of, wait_for
from tests.e2e.test_transport_e2e import initialize, session_headers
from tests.era_upstreams import start_stateless_upstream
from tests.upstreams import TOOL_EVENTS

pytestmark = pytest.mark.e2e

MODERN = "2026-07-28"


@pytest.fixture(scope="module")
def stateless_server(upstream_runner: Any) -> Any:
    return start_stateless_upstream(upstream_runner, "acme", f"CANARY-acme-{secrets.token_hex(4)}")


@pytest.fixture
def stateless(stateless_server: Any) -> Any:
    stateless_server.recorder.clear()
    return stateless_server


def calls(upstream: Any, name: str | None = None) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """(headers, message) of each tools/call the upstream got (of tool `name`, if given)."""
    found = []
    for record in upstream.recorder.snapshot():
        message = json.loads(record.text) if record.body else {}
        if message.get("method") == "tools/call" and name in (None, message["params"]["name"]):
            found.append((record.headers, message))
    return found


async def test_a_legacy_client_uses_a_stateless_2026_server_through_a_session_the_proxy_keeps(
    make_proxy: StartProxy, stateless: Any
) -> None:
    running = await make_proxy({"acme": stateless})
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    token = running.token("acme")
    async with client_for(running.url, token, "legacy", elicitation_callback=pick_teal) as client:
        assert client.protocol_version == "2025-11-25"
        assert "whoami" in [tool.name for tool in (await client.list_tools()).tools]
        assert stateless.canary in text_of(await client.call_tool("whoami", {}))
        done = await client.call_tool("countdown", {"n": 3, "delay": 0.01}, progress_callback=on_progress)
        resource = await client.read_resource("notes://acme/first")
        prompt = await client.get_prompt("summarize_notes", {"tenant_id": "acme"})
        elicited = await client.call_tool("ask_user", {"topic": "porch"})
    assert json.loads(text_of(done))["done"] == 3
    assert progress == [1, 2, 3]
    assert stateless.canary in resource.contents[0].text
    assert stateless.canary in prompt.messages[0].content.text
    assert json.loads(text_of(elicited))["colour"] == "teal"
    for headers, message in calls(stateless):
        assert headers["mcp-protocol-version"] == MODERN  # every call in 2026-07-28, no session
        assert "mcp-session-id" not in headers
        meta = message["params"]["_meta"]
        assert meta["io.modelcontextprotocol/protocolVersion"] == MODERN
        assert "elicitation" in meta["io.modelcontextprotocol/clientCapabilities"]  # from initialize
    first, retry = calls(stateless, "ask_user")  # input_required, then the retry with the answer
    assert "inputResponses" not in first[1]["params"]
    assert [answer["content"] for answer in retry[1]["params"]["inputResponses"].values()] == [
        {"colour": "teal"}
    ]


async def test_a_legacy_client_cancelling_a_call_closes_it_upstream(
    make_proxy: StartProxy, stateless: Any
) -> None:
    running = await make_proxy({"acme": stateless})
    tag = secrets.token_hex(6)
    started = asyncio.Event()

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        started.set()

    async with client_for(running.url, running.token("acme"), "legacy") as client:
        arguments = {"tag": tag, "n": 50, "delay": 0.1}
        call = asyncio.create_task(
            client.call_tool("watched_countdown", arguments, progress_callback=on_progress)
        )
        await asyncio.wait_for(started.wait(), 10)
        call.cancel()  # the SDK sends notifications/cancelled on the session
        with contextlib.suppress(asyncio.CancelledError):
            await call
        events = TOOL_EVENTS.setdefault(tag, [])
        assert await wait_for(lambda: "cancelled" in events), events
        assert stateless.canary in text_of(await client.call_tool("whoami", {}))  # the session carries on
    assert "finished" not in events


async def test_each_session_kept_by_the_proxy_is_its_callers_alone(
    make_proxy: StartProxy, stateless: Any
) -> None:
    running = await make_proxy({"acme": stateless})
    alice, bob = running.token("acme", sub="alice"), running.token("acme", sub="bob")
    sessions = {
        "alice": await initialize(running, alice, {"elicitation": {}}),
        "bob": await initialize(running, bob, {"sampling": {}}),
    }
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}}
    for user, token in (("alice", alice), ("bob", bob)):
        status, _, raw = await running.post(body, token=token, headers=session_headers(sessions[user]))
        assert status == 200 and stateless.canary in raw.decode()
    seen = [m["params"]["_meta"]["io.modelcontextprotocol/clientCapabilities"] for _, m in calls(stateless)]
    assert seen == [{"elicitation": {}}, {"sampling": {}}]  # each call carried its own session's
    status, _, _ = await running.post(body, token=bob, headers=session_headers(sessions["alice"]))
    assert status == 404  # alice's session is not bob's
    assert len(calls(stateless)) == 2


@pytest.fixture(scope="module")
def stateless_tasks_server(upstream_runner: Any) -> Any:
    from tests.task_upstreams import start_fastmcp_tasks

    return start_fastmcp_tasks(upstream_runner, f"CANARY-acme-{secrets.token_hex(4)}", stateless=True)


async def test_a_legacy_client_is_never_handed_an_upstream_task_it_could_not_follow(
    make_proxy: StartProxy, stateless_tasks_server: Any
) -> None:
    """Task handles are not bridged: the stateless upstream (FastMCP with the tasks extension) is not
    told the client can use tasks, nor the client that the server offers them, and a 2025-11-25
    task-augmented call is answered as a plain call; never a raw upstream task id nobody can get or
    cancel (while its work runs on upstream)."""
    upstream = stateless_tasks_server
    upstream.recorder.clear()
    running = await make_proxy({"acme": upstream})
    token = running.token("acme")
    extension: dict[str, Any] = {
        "extensions": {"io.modelcontextprotocol/tasks": {}},
        "tasks": {"requests": {}},
    }
    status, headers, raw = await running.post(
        {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": extension,
            "clientInfo": {"name": "raw-test", "version": "0"}}},
        token=token,
    )  # fmt: skip
    assert status == 200, raw
    capabilities = json.loads(raw)["result"]["capabilities"]
    assert "tasks" not in capabilities
    assert "io.modelcontextprotocol/tasks" not in capabilities.get("extensions", {})
    session = session_headers(headers["Mcp-Session-Id"])
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    await running.post(initialized, token=token, headers=session)
    plain = {"name": "slow_canary", "arguments": {}}
    for params in (plain, {**plain, "task": {}}):
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
        status, _, raw = await running.post(body, token=token, headers=session)
        assert status == 200, raw
        events = [line[5:] for line in raw.decode().splitlines() if line.startswith("data:")]
        [message] = [json.loads(data) for data in events] or [json.loads(raw)]
        result = message["result"]
        assert "task" not in result and "taskId" not in json.dumps(result), result
        assert upstream.canary in json.dumps(result)
    for _, message in calls(upstream):
        declared = message["params"]["_meta"]["io.modelcontextprotocol/clientCapabilities"]
        assert "io.modelcontextprotocol/tasks" not in declared.get("extensions", {})
        assert "task" not in message["params"]
