"""The TypeScript SDK client (1.32, handshake era) in front of the proxy, the reference server
@modelcontextprotocol/server-everything behind it, over streamable HTTP and over stdio: the client
gets through the proxy what it gets from the server directly (tools, progress, resources, prompts),
and a tool the tenant's policy denies is an MCP error it can handle, not a broken transport. Behind
it too, a server that closes a call's stream to be polled: the client resumes it through the proxy.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from tests.conftest import StartProxy
from tests.interop.conftest import node_package, sdk_client
from tests.upstreams import start_resumable_upstream

pytestmark = pytest.mark.e2e

STEPS: list[dict[str, Any]] = [
    {"do": "listTools"},
    {"do": "callTool", "name": "get-sum", "arguments": {"a": 2, "b": 3}},
    {
        "do": "callTool",
        "name": "trigger-long-running-operation",
        "arguments": {"duration": 0.3, "steps": 3},
        "progress": True,
    },
    {"do": "listResources"},
    {"do": "readResource", "uri": "demo://resource/static/document/architecture.md"},
    {"do": "listPrompts"},
    {"do": "getPrompt", "name": "args-prompt", "arguments": {"city": "Paris", "state": "IDF"}},
]
DENIED = {"do": "callTool", "name": "get-env", "arguments": {}}  # it returns the server's environment
POLICY = {"tools": {"allow": ["*"], "deny": ["get-env"]}}


def without_denied(answers: dict[str, Any]) -> list[Any]:
    """What each step gave, the denied tool left out of the tool list (the policy hides it)."""
    steps = [dict(step) for step in answers["steps"]]
    steps[0] = {"ok": [name for name in steps[0]["ok"] if name != "get-env"]}
    return steps


@pytest.mark.parametrize("transport", ["http", "stdio"])
async def test_the_typescript_client_gets_through_the_proxy_what_it_gets_directly(
    make_proxy: StartProxy, everything_http: str, transport: str
) -> None:
    direct = await sdk_client(everything_http, None, STEPS)
    assert direct["protocolVersion"] == "2025-11-25" and not direct.get("connectError"), direct
    assert all("ok" in step for step in direct["steps"]), direct["steps"]
    progress = direct["steps"][2]["ok"]["progress"]
    assert progress == [[1, 3], [2, 3], [3, 3]]
    if transport == "http":
        upstream: dict[str, Any] = {"url": everything_http}
    else:
        server = node_package("@modelcontextprotocol/server-everything")
        upstream = {"command": ["node", str(server), "stdio"]}
    running = await make_proxy(
        {"acme": everything_http},
        policies={"acme": POLICY},
        tenants={"acme": {"upstream": upstream, "policy": "acme"}},
    )
    proxied = await sdk_client(running.url, running.token("acme"), [*STEPS, DENIED])
    assert proxied["protocolVersion"] == "2025-11-25" and not proxied.get("connectError"), proxied
    assert without_denied(proxied)[: len(STEPS)] == without_denied(direct)
    refusal = proxied["steps"][-1]["error"]
    assert refusal["name"] == "McpError", refusal  # an MCP error, not "Error POSTing to endpoint"
    assert refusal["code"] == -32005 and "tools.deny" in refusal["message"]
    assert not any("POSTing" in error for error in proxied["transportErrors"]), proxied["transportErrors"]


async def test_the_typescript_client_resumes_a_stream_the_upstream_closed_mid_call(
    make_proxy: StartProxy, upstream_runner: Any
) -> None:
    """SEP-1699 polling: the Python SDK's server closes the POST stream (ctx.close_sse_stream()) after
    a priming event with retry; the TypeScript client resumes it by itself with GET + Last-Event-ID."""
    upstream = start_resumable_upstream(upstream_runner, "acme", f"CANARY-acme-{secrets.token_hex(6)}")
    running = await make_proxy({"acme": upstream})
    step = {"do": "callTool", "name": "close_then_finish", "arguments": {"seconds": 0.2}, "progress": True}
    answers = await sdk_client(running.url, running.token("acme"), [step])
    assert not answers.get("connectError"), answers
    called = answers["steps"][0]["ok"]
    assert called["result"]["content"][0]["text"] == f"finished after the stream was closed {upstream.canary}"
    assert called["progress"] == [[1, 2], [2, 2]]
    assert any(r.method == "GET" and "last-event-id" in r.headers for r in upstream.recorder.snapshot())
