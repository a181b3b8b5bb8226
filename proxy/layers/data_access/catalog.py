"""What the proxy knows of a tenant's tools and prompts: their declared arguments.

Learned from every tools/list and prompts/list result relayed to the tenant's clients, and fetched
by the proxy itself (all pages) when a request names one it has not seen. One catalog per tenant:
the proxy's upstream credentials are per tenant, so every caller of a tenant sees the same lists.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from dataclasses import dataclass
from typing import Any, Literal

from proxy import __version__
from proxy.layers.data_access.known_resources import KnownResources
from proxy.layers.data_access.schemas import SchemaIndex
from proxy.protocol.errors import ProxyError, UpstreamError
from proxy.protocol.headers import ParamHeader, param_headers_of
from proxy.protocol.jsonrpc import dumps
from proxy.types import LATEST_MODERN_VERSION, JsonObject
from proxy.upstreams.base import Upstream, UpstreamRequest, answer_to

Listing = Literal["tools", "prompts"]
MAX_PAGES = 50
REFETCH_AFTER_SECONDS = 60.0
_ids = itertools.count(1)


@dataclass(frozen=True)
class CatalogEntry:
    """A tool (inputSchema) or prompt (arguments, as an equivalent flat schema) of the upstream."""

    name: str
    input_schema: JsonObject
    param_headers: tuple[ParamHeader, ...] | None  # tools only; None: invalid annotations

    @functools.cached_property
    def schema(self) -> SchemaIndex:
        """The input schema with its references resolvable, built once per entry, not per request."""
        return SchemaIndex(self.input_schema)


def entry_of(kind: Listing, item: Any) -> CatalogEntry | None:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    if kind == "tools":
        schema = item.get("inputSchema")
        schema = schema if isinstance(schema, dict) else {}
        return CatalogEntry(item["name"], schema, param_headers_of(schema))
    arguments = item.get("arguments")
    names = [a["name"] for a in arguments or [] if isinstance(a, dict) and isinstance(a.get("name"), str)]
    return CatalogEntry(
        item["name"], {"type": "object", "properties": {n: {"type": "string"} for n in names}}, ()
    )


@dataclass(frozen=True, slots=True)
class SessionRoute:
    """How to reach a handshake-era upstream that lists only inside a session."""

    upstream_session_id: str
    protocol_version: str


class Catalog:
    def __init__(self, upstream: Upstream) -> None:
        self._upstream = upstream
        self._entries: dict[Listing, dict[str, CatalogEntry]] = {"tools": {}, "prompts": {}}
        self._fetched_at: dict[Listing, float] = {"tools": 0.0, "prompts": 0.0}
        self._lock = asyncio.Lock()
        self.resources = KnownResources()  # URIs and templates its lists offered the tenant

    def learn(self, kind: Listing, result: Any) -> None:
        """Record the tools or prompts of a list result page the upstream sent."""
        items = result.get(kind) if isinstance(result, dict) else None
        for item in items if isinstance(items, list) else []:
            entry = entry_of(kind, item)
            if entry is not None:
                self._entries[kind][entry.name] = entry

    def forget(self, kind: Listing) -> None:
        """The upstream's list changed (list_changed, reload): it must be learned again."""
        self._entries[kind] = {}
        self._fetched_at[kind] = 0.0

    def cached(self, kind: Listing, name: str) -> CatalogEntry | None:
        return self._entries[kind].get(name)

    async def lookup(
        self, kind: Listing, name: str, route: SessionRoute | None = None
    ) -> CatalogEntry | None:
        """The entry, listing the upstream when the name is unknown (at most once a minute per kind)."""
        entry = self._entries[kind].get(name)
        if entry is not None:
            return entry
        async with self._lock:
            entry = self._entries[kind].get(name)
            if entry is None and time.monotonic() - self._fetched_at[kind] > REFETCH_AFTER_SECONDS:
                self._fetched_at[kind] = time.monotonic()
                await self._fetch_all(kind, route)
                entry = self._entries[kind].get(name)
        return entry

    async def _fetch_all(self, kind: Listing, route: SessionRoute | None) -> None:
        cursor: str | None = None
        fresh: dict[str, CatalogEntry] = {}
        for _ in range(MAX_PAGES):
            result = await self._list_page(kind, cursor, route)
            for item in result.get(kind) or []:
                entry = entry_of(kind, item)
                if entry is not None:
                    fresh[entry.name] = entry
            next_cursor = result.get("nextCursor")
            if not isinstance(next_cursor, str) or not next_cursor:
                break
            cursor = next_cursor
        self._entries[kind] = fresh

    async def _list_page(self, kind: Listing, cursor: str | None, route: SessionRoute | None) -> JsonObject:
        method = f"{kind}/list"
        request_id = f"mcp-tenant-proxy-catalog-{next(_ids)}"
        params: JsonObject = {} if cursor is None else {"cursor": cursor}
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if route is None:
            params["_meta"] = {
                "io.modelcontextprotocol/protocolVersion": LATEST_MODERN_VERSION,
                "io.modelcontextprotocol/clientCapabilities": {},
                "io.modelcontextprotocol/clientInfo": {"name": "mcp-tenant-proxy", "version": __version__},
            }
            headers.update({"MCP-Protocol-Version": LATEST_MODERN_VERSION, "Mcp-Method": method})
        else:
            headers.update(
                {"Mcp-Session-Id": route.upstream_session_id, "MCP-Protocol-Version": route.protocol_version}
            )
        body = dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        response = await self._upstream.send(UpstreamRequest("POST", headers, body))
        try:
            if response.status != 200:
                raise UpstreamError(f"The upstream MCP server could not list its {kind}")
            message = await answer_to(response, request_id)
        except ProxyError as exc:
            if isinstance(exc, UpstreamError):
                raise
            raise UpstreamError(f"The upstream MCP server could not list its {kind}") from None
        finally:
            response.close()
        result = message.get("result") if isinstance(message, dict) else None
        if not isinstance(result, dict):
            raise UpstreamError(f"The upstream MCP server could not list its {kind}")
        return result
