"""Upstreams that speak one protocol era only, for the era bridging tests.

The SDK's MCPServer speaks both eras; these make it speak one:
  handshake-only   a 2025-era server (as SDK 1.x servers answer): a 2026-07-28 request, or a request
                   without a session, gets HTTP 400 and no JSON-RPC answer
  stateless        `stateless_http=True`: no sessions, so no back channel in the handshake era;
                   2026-07-28 requests (MRTR) carry what needs the client
Both keep the test tools, and a per-session memory (`remember`, `recall`) that shows whose session
a call ran on.
"""

from __future__ import annotations

import json
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp_types import EmptyResult, SubscribeRequestParams, UnsubscribeRequestParams

from proxy.demo_upstream import build_notes_server
from tests.upstreams import (
    ASGIApp,
    Recorder,
    Upstream,
    UpstreamThread,
    add_notification_tools,
    add_test_tools,
    free_port,
)

HANDSHAKE_VERSIONS = (b"2024-11-05", b"2025-03-26", b"2025-06-18", b"2025-11-25")
# What each upstream session remembered, by its Mcp-Session-Id (the upstream runs in this process).
MEMORY: dict[str, list[str]] = {}


class HandshakeOnly:
    """ASGI middleware: refuses what a 2025-era server cannot take, as such a server does."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = dict(scope["headers"])
            version = headers.get(b"mcp-protocol-version")
            if version is not None and version not in HANDSHAKE_VERSIONS:
                await _bad_request(send, f"Bad Request: Unsupported protocol version: {version.decode()}")
                return
            if b"mcp-session-id" not in headers:
                body, more = b"", True
                while more:
                    message = await receive()
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                if json.loads(body).get("method") != "initialize":
                    await _bad_request(send, "Bad Request: Server not initialized")
                    return
                receive = _replay(body, receive)
        await self.app(scope, receive, send)


def _replay(body: bytes, receive: Any) -> Any:
    """The body read already, then whatever comes next (the client's disconnect)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return dict(await receive())
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _bad_request(send: Any, message: str) -> None:
    body = json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": -32000, "message": message}}).encode()
    await send(
        {"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": body})


def add_memory_tools(server: MCPServer) -> None:
    def session_of(ctx: Context) -> str:
        headers = {key.lower(): value for key, value in (ctx.headers or {}).items()}
        return str(headers.get("mcp-session-id"))

    @server.tool()
    def remember(text: str, ctx: Context) -> dict[str, Any]:
        """Keeps `text` in this upstream session's memory."""
        MEMORY.setdefault(session_of(ctx), []).append(text)
        return {"remembered": len(MEMORY[session_of(ctx)])}

    @server.tool()
    def recall(ctx: Context) -> dict[str, Any]:
        """What this upstream session remembered."""
        return {"memory": MEMORY.get(session_of(ctx), [])}


def add_subscriptions(server: MCPServer) -> None:
    """resources/subscribe and unsubscribe, so the server offers `resources.subscribe` (updates are
    sent by the `broadcast_update` tool, on the session's GET stream)."""

    async def accept(context: Any, params: Any) -> EmptyResult:
        return EmptyResult()

    lowlevel = server._lowlevel_server  # (MCPServer has no decorator for these)
    lowlevel.add_request_handler("resources/subscribe", SubscribeRequestParams, accept)
    lowlevel.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, accept)


def _server(tenant: str, canary: str) -> MCPServer:
    server = build_notes_server(tenant, canary)
    add_test_tools(server, canary)
    add_notification_tools(server)
    add_memory_tools(server)
    add_subscriptions(server)
    return server


def start_handshake_only_upstream(runner: UpstreamThread, tenant: str, canary: str) -> Upstream:
    recorder = Recorder(HandshakeOnly(_server(tenant, canary).streamable_http_app(host="127.0.0.1")))
    port = free_port()
    runner.serve(recorder, port)
    return Upstream(tenant, canary, port, recorder)


def start_stateless_upstream(runner: UpstreamThread, tenant: str, canary: str) -> Upstream:
    recorder = Recorder(_server(tenant, canary).streamable_http_app(host="127.0.0.1", stateless_http=True))
    port = free_port()
    runner.serve(recorder, port)
    return Upstream(tenant, canary, port, recorder)
