"""Call an MCP server through mcp-tenant-proxy with the official Python SDK (`pip install mcp`).

    export MCP_TOKEN=$(mcp-tenant-proxy mint-token --config CONFIG --issuer dev --tenant acme --sub alice)
    python python_client.py http://127.0.0.1:8080/mcp                       # list the tools
    python python_client.py http://127.0.0.1:8080/mcp whoami                # call one
    python python_client.py http://127.0.0.1:8080/mcp echo '{"message": "hi"}'

The proxy is an MCP server to the client: only the bearer token is added. `mode="auto"` (the
default) speaks 2026-07-28 where the server does and falls back to the handshake era;
`mode="legacy"` forces the handshake era.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


async def main(url: str, tool: str | None, arguments: dict[str, object]) -> None:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {os.environ['MCP_TOKEN']}"}, timeout=60)
    async with Client(streamable_http_client(url, http_client=http)) as client:
        if tool is None:
            print("\n".join(t.name for t in (await client.list_tools()).tools))
            return
        result = await client.call_tool(tool, arguments)
        if result.structured_content is not None:
            print(json.dumps(result.structured_content))
        else:
            print("\n".join(getattr(block, "text", "") for block in result.content))
        if result.is_error:
            sys.exit(1)


if __name__ == "__main__":
    url = sys.argv[1]
    tool = sys.argv[2] if len(sys.argv) > 2 else None
    arguments = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    asyncio.run(main(url, tool, arguments))
