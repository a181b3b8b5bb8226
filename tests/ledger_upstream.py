"""A deliberately unprotected shared upstream for the `verify` tests: an SDK MCPServer that trusts
every organisation id it is given, in the shapes real servers use.

    record_entry(org_id, text)          an open tenant argument at the top level
    find_entries(filter: EntryFilter)   one reached through $ref (#/$defs/EntryFilter)
    recent_entries(limit)               a shared activity log: every caller sees every org's entries
    export_report(options: dict)        a free-form object
    current_user_profile()              a result that depends on the caller
    ledger://{org_id}/entries           a resource template with an open tenant variable
"""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver import MCPServer
from pydantic import BaseModel, Field

from tests.upstreams import Recorder, Upstream, UpstreamThread, free_port


class EntryFilter(BaseModel):
    """Which organisation's entries to read, and what they must contain."""

    org_id: str = Field(description="The organization whose ledger to read")
    text: str = ""


def build_ledger_server() -> MCPServer:
    server = MCPServer("ledger", instructions="A ledger shared by every organisation")
    entries: dict[str, list[str]] = {}
    activity: list[str] = []

    @server.tool()
    def record_entry(org_id: str, text: str) -> dict[str, Any]:
        """Record an entry in an organization's ledger."""
        entries.setdefault(org_id, []).append(text)
        activity.append(f"{org_id} recorded {text}")
        return {"org_id": org_id, "count": len(entries[org_id])}

    @server.tool()
    def find_entries(filter: EntryFilter) -> dict[str, Any]:
        """Find an organization's ledger entries containing a text."""
        return {"entries": [e for e in entries.get(filter.org_id, []) if filter.text in e]}

    @server.tool()
    def recent_entries(limit: int = 20) -> dict[str, Any]:
        """The most recent ledger activity."""
        return {"activity": activity[-limit:]}

    @server.tool()
    def export_report(options: dict[str, Any]) -> dict[str, Any]:
        """Export a report; options are passed to the report engine as they are."""
        return {"exported": sorted(options)}

    @server.tool()
    def current_user_profile() -> dict[str, Any]:
        """The profile of the current user."""
        return {"profile": "whoever is calling"}

    @server.resource("ledger://{org_id}/entries")
    def ledger_entries(org_id: str) -> str:
        """An organization's ledger, as a resource."""
        return "\n".join(entries.get(org_id, []))

    return server


def start_ledger_upstream(runner: UpstreamThread) -> Upstream:
    recorder = Recorder(build_ledger_server().streamable_http_app(host="127.0.0.1"))
    port = free_port()
    runner.serve(recorder, port)
    return Upstream("shared", "", port, recorder)
