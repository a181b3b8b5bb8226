"""The SDK upstream: the official SDK's MCPServer under uvicorn, in its own process.

No `from __future__ import annotations` here: the SDK reads the tools' annotations at runtime.
"""

import asyncio
import logging
import os
from typing import Any

import uvicorn
import uvloop
from mcp.server.caching import CacheHint
from mcp.server.mcpserver import Context, MCPServer


def build_sdk_server(cache_hints: bool) -> MCPServer:
    """`lookup(tenant_id, key)` (trusts its tenant argument), `whoami`, and `progress(n)`."""
    hints: Any = {"tools/list": CacheHint(ttl_ms=300_000, scope="public")} if cache_hints else None
    server = MCPServer("bench-upstream", cache_hints=hints)

    @server.tool()
    def lookup(tenant_id: str, key: str) -> dict[str, Any]:
        """Look a key up in an organisation's table."""
        return {"tenant_id": tenant_id, "key": key, "value": f"value-of-{key}", "found": True}

    @server.tool()
    def whoami() -> dict[str, Any]:
        """Which process answered."""
        return {"pid": os.getpid()}

    @server.tool()
    async def progress(n: int, ctx: Context) -> dict[str, Any]:
        """Reports progress n times as fast as it can, then answers."""
        for step in range(n):
            await ctx.report_progress(step + 1, n)
        return {"done": n}

    return server


def run_sdk(port: int, cache_hints: bool) -> None:
    logging.basicConfig(level=logging.WARNING)
    # Sessions: the SDK defaults (10,000, 30 min idle) raised so that no benchmark runs into them.
    app = build_sdk_server(cache_hints).streamable_http_app(
        host="127.0.0.1", max_sessions=100_000, session_idle_timeout=3600
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            ws="none",
            loop="uvloop",
            backlog=4096,
        )
    )

    async def serve() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        print("ready", flush=True)
        await task

    uvloop.run(serve())
