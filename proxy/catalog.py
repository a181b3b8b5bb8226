"""What the proxy knows of a tenant's tools: each tool's inputSchema and its Mcp-Param-* annotations.

Learned from every tools/list result relayed to the tenant's clients, and fetched by the proxy
itself (modern era, all pages) when a call names a tool it has not seen. One catalog per tenant:
the proxy's upstream credentials are per tenant, so every caller of a tenant sees the same tools.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from typing import Any

from proxy import __version__
from proxy.errors import UpstreamError
from proxy.headers import ParamHeader, param_headers_of
from proxy.jsonrpc import dumps, loads_strict
from proxy.types import LATEST_MODERN_VERSION, JsonObject
from proxy.upstream import EVENT_STREAM, Upstream, UpstreamRequest

MAX_PAGES = 50
REFRESH_AFTER_SECONDS = 60.0
_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class ToolInfo:
    name: str
    input_schema: JsonObject
    param_headers: tuple[ParamHeader, ...] | None  # None: invalid annotations, mirror nothing


def tool_info(tool: Any) -> ToolInfo | None:
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
        return None
    schema = tool.get("inputSchema")
    schema = schema if isinstance(schema, dict) else {}
    return ToolInfo(tool["name"], schema, param_headers_of(schema))


class ToolCatalog:
    def __init__(self, upstream: Upstream) -> None:
        self._upstream = upstream
        self._tools: dict[str, ToolInfo] = {}
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()

    def learn(self, result: Any) -> None:
        """Record the tools of a tools/list result page the upstream sent."""
        tools = result.get("tools") if isinstance(result, dict) else None
        if isinstance(tools, list):
            for tool in tools:
                info = tool_info(tool)
                if info is not None:
                    self._tools[info.name] = info

    def forget(self) -> None:
        """The upstream's tools changed (list_changed, reload): everything must be learned again."""
        self._tools.clear()
        self._fetched_at = 0.0

    def cached(self, name: str) -> ToolInfo | None:
        return self._tools.get(name)

    async def tool(self, name: str) -> ToolInfo | None:
        """The tool's info, fetching the list when the tool is unknown (at most once a minute)."""
        info = self._tools.get(name)
        if info is not None:
            return info
        async with self._lock:
            info = self._tools.get(name)
            if info is None and time.monotonic() - self._fetched_at > REFRESH_AFTER_SECONDS:
                await self._fetch_all()
                info = self._tools.get(name)
        return info

    async def _fetch_all(self) -> None:
        cursor: str | None = None
        fresh: dict[str, ToolInfo] = {}
        for _ in range(MAX_PAGES):
            result = await self._list_page(cursor)
            for tool in result.get("tools") or []:
                info = tool_info(tool)
                if info is not None:
                    fresh[info.name] = info
            next_cursor = result.get("nextCursor")
            if not isinstance(next_cursor, str) or not next_cursor:
                break
            cursor = next_cursor
        self._tools = fresh
        self._fetched_at = time.monotonic()

    async def _list_page(self, cursor: str | None) -> JsonObject:
        params: JsonObject = {
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": LATEST_MODERN_VERSION,
                "io.modelcontextprotocol/clientCapabilities": {},
                "io.modelcontextprotocol/clientInfo": {"name": "mcp-tenant-proxy", "version": __version__},
            }
        }
        if cursor is not None:
            params["cursor"] = cursor
        request_id = f"mcp-tenant-proxy-catalog-{next(_ids)}"
        request = UpstreamRequest(
            "POST",
            {
                "Content-Type": "application/json",
                "Accept": "application/json, text/event-stream",
                "MCP-Protocol-Version": LATEST_MODERN_VERSION,
                "Mcp-Method": "tools/list",
            },
            dumps({"jsonrpc": "2.0", "id": request_id, "method": "tools/list", "params": params}),
        )
        response = await self._upstream.send(request)
        try:
            if response.status != 200:
                raise UpstreamError("The upstream MCP server could not list its tools")
            if response.content_type == EVENT_STREAM:
                message = None
                async for event in response.events():
                    data = getattr(event, "data", "")
                    if data:
                        candidate = loads_strict(data.encode())
                        if isinstance(candidate, dict) and candidate.get("id") == request_id:
                            message = candidate
                            break
            else:
                message = loads_strict(await response.read_json())
        finally:
            response.close()
        result = message.get("result") if isinstance(message, dict) else None
        if not isinstance(result, dict):
            raise UpstreamError("The upstream MCP server could not list its tools")
        return result
