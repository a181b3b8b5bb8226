"""The TypeScript SDK client (1.32, handshake era) in front of the proxy, the reference server
@modelcontextprotocol/server-everything behind it, over streamable HTTP and over stdio: the client
gets through the proxy what it gets from the server directly (tools, progress, resources, prompts),
and a tool the tenant's policy denies is an MCP error it can handle, not a broken transport.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import StartProxy
from tests.interop.conftest import node_package, sdk_client

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
