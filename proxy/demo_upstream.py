"""A small notes service built on the official MCP SDK: the demo's (and the tests') upstream.

It knows nothing about the proxy: like many shared MCP servers it takes a `tenant_id` argument and
trusts it. Every answer carries the server's canary, so a test can tell whose server answered.
Needs the `mcp` package (the `demo` extra); the proxy itself never imports this module.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from pydantic import BaseModel, Field

TenantArg = Annotated[str, Field(description="The organisation whose notes to use")]


class NoteQuery(BaseModel):
    """What to search for, and in whose notes (a nested model: SDKs declare it under $defs)."""

    tenant_id: TenantArg
    text: str = ""


def build_notes_server(tenant: str, canary: str) -> MCPServer:
    """One tenant's notes server; `canary` appears in everything it returns."""
    server = MCPServer(f"notes-{tenant}", instructions=f"Notes of {tenant}")
    notes: dict[str, list[str]] = {}

    @server.tool()
    def add_note(tenant_id: TenantArg, text: str) -> dict[str, Any]:
        """Add a note to an organisation's notebook."""
        notes.setdefault(tenant_id, []).append(text)
        return {"tenant_id": tenant_id, "count": len(notes[tenant_id]), "canary": canary}

    @server.tool()
    def list_notes(tenant_id: TenantArg) -> dict[str, Any]:
        """List an organisation's notes."""
        return {"tenant_id": tenant_id, "notes": notes.get(tenant_id, []), "canary": canary}

    @server.tool()
    def search_notes(query: NoteQuery) -> dict[str, Any]:
        """Search an organisation's notes for a text."""
        found = [note for note in notes.get(query.tenant_id, []) if query.text in note]
        return {"tenant_id": query.tenant_id, "notes": found, "canary": canary}

    @server.tool()
    def whoami() -> dict[str, Any]:
        """Which server answered: its tenant, canary and process id."""
        return {"server_tenant": tenant, "canary": canary, "pid": os.getpid()}

    @server.tool()
    def region_report(
        region: Annotated[str, Field(json_schema_extra={"x-mcp-header": "Region"})],
    ) -> dict[str, Any]:
        """A report for one region (the region is mirrored in the Mcp-Param-Region header)."""
        return {"region": region, "canary": canary}

    @server.tool()
    def request_headers(ctx: Context) -> dict[str, Any]:
        """The HTTP headers this request arrived with (to show what the proxy forwards)."""
        headers = ctx.headers or {}
        return {"headers": {key.lower(): value for key, value in headers.items()}, "canary": canary}

    @server.resource("notes://{tenant_id}/{name}")
    def note_resource(tenant_id: str, name: str) -> str:
        """One note of an organisation, as a resource."""
        return f"note {name} of {tenant_id} ({canary})"

    @server.prompt()
    def summarize_notes(tenant_id: str, topic: str = "everything") -> str:
        """A prompt to summarise an organisation's notes."""
        return f"Summarise the notes of {tenant_id} about {topic}. ({canary})"

    return server


if __name__ == "__main__":  # python -m proxy.demo_upstream TENANT CANARY [stdio|PORT]
    tenant_arg, canary_arg, where = sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "stdio"
    notes_server = build_notes_server(tenant_arg, canary_arg)
    if where == "stdio":
        notes_server.run("stdio")
    else:
        notes_server.run("streamable-http", host="127.0.0.1", port=int(where))
