"""verify's MCP client: the era it settles on, and the headers each era's server requires."""

from __future__ import annotations

import json
from typing import Any

from proxy.types import Era
from proxy.upstreams.base import MockResponse, MockUpstream, UpstreamRequest
from proxy.verify.client import McpClient

REGION_TOOL = {
    "name": "region_report",
    "inputSchema": {"type": "object", "properties": {"region": {"type": "string", "x-mcp-header": "Region"}}},
}


def handshake_only(request: UpstreamRequest) -> MockResponse:
    """A 2025-11-25 server: no server/discover, sessions from initialize."""
    if request.http_method == "DELETE":
        return MockResponse(200, {})
    message: dict[str, Any] = json.loads(request.body or b"{}")
    if "id" not in message:
        return MockResponse(202)
    if message["method"] == "server/discover":
        error = {"code": -32601, "message": "Method not found"}
        return MockResponse(200, {"jsonrpc": "2.0", "id": message["id"], "error": error})
    if message["method"] == "initialize":
        result = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}}, "serverInfo": {"name": "s"}}
        return MockResponse(body={"jsonrpc": "2.0", "id": message["id"], "result": result}, session_id="s-1")
    assert request.headers.get("Mcp-Session-Id") == "s-1"
    return MockResponse(body={"jsonrpc": "2.0", "id": message["id"], "result": {"tools": [REGION_TOOL]}})


async def test_a_server_without_discover_is_spoken_to_in_the_handshake_era() -> None:
    upstream = MockUpstream(handshake_only)
    client = McpClient(upstream, "scripted")
    await client.connect()
    assert client.era is Era.HANDSHAKE and client.session_id == "s-1" and client.version == "2025-11-25"
    assert await client.list_all("tools/list", "tools") == [REGION_TOOL]
    await client.close()
    sent = [(r.http_method, json.loads(r.body)["method"] if r.body else None) for r in upstream.requests]
    assert sent == [
        ("POST", "server/discover"),
        ("POST", "initialize"),
        ("POST", "notifications/initialized"),
        ("POST", "tools/list"),
        ("DELETE", None),
    ]
    assert upstream.requests[-1].headers["Mcp-Session-Id"] == "s-1"
    assert upstream.requests[3].headers["MCP-Protocol-Version"] == "2025-11-25"


async def test_modern_requests_carry_the_envelope_and_mirrored_headers() -> None:
    results = {
        "server/discover": {"supportedVersions": ["2026-07-28"], "capabilities": {}},
        "tools/list": {"tools": [REGION_TOOL]},
        "tools/call": {"content": [], "isError": False},
    }
    upstream = MockUpstream(results=results)
    client = McpClient(upstream, "scripted")
    await client.connect()
    assert client.era is Era.MODERN and client.session_id is None
    await client.list_all("tools/list", "tools")
    reply = await client.request("tools/call", {"name": "region_report", "arguments": {"region": "eu-west"}})
    assert reply.ok
    call = upstream.requests[-1]
    assert call.headers["Mcp-Method"] == "tools/call" and call.headers["Mcp-Name"] == "region_report"
    assert call.headers["Mcp-Param-Region"] == "eu-west"
    meta = json.loads(call.body or b"{}")["params"]["_meta"]
    assert (
        meta["io.modelcontextprotocol/protocolVersion"]
        == call.headers["MCP-Protocol-Version"]
        == "2026-07-28"
    )
