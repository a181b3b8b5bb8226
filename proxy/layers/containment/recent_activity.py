"""`proxy_recent_activity`: a tool the proxy itself offers (policy `recent_activity`), answering from
the audit summaries of the caller (by default) or of the caller's tenant (`scope: tenant`), and
nothing else; names the tenant's catalog does not know are never echoed (tools and prompts it
lists; URIs its resources/list offered or its resource templates match, printable and bounded).

    answer         check: a call of the tool is answered here, never forwarded
    offer          response hook: the first page of tools/list lists the tool
"""

from __future__ import annotations

import json

from aiohttp import web

from proxy.flow import Call, Request, ServerKind, ServerMessage
from proxy.layers.containment.audit import RECENT_PER_TENANT
from proxy.layers.data_access.catalog import Listing
from proxy.layers.data_access.engine import foreign_uri
from proxy.protocol.jsonrpc import answer_bytes, dumps
from proxy.types import Era, JsonObject

RECENT_ACTIVITY_TOOL = "proxy_recent_activity"
HIDDEN_NAME = "(not shown)"
_LISTINGS: dict[str, Listing] = {"tools/call": "tools", "prompts/get": "prompts"}
_ACTIVITY_FIELDS = ("ts", "method", "name", "outcome", "cache", "duration_ms", "result_bytes")


def recent_activity_tool(max_records: int) -> JsonObject:
    return {
        "name": RECENT_ACTIVITY_TOOL,
        "description": (
            "Recent MCP activity of your organisation through this proxy: summaries only "
            "(method, tool or resource name, outcome, cache use, timing), newest first."
        ),
        "inputSchema": {
            "type": "object",
            "properties": {"limit": {"type": "integer", "minimum": 1, "maximum": max_records}},
        },
    }


async def answer(call: Request) -> None:
    """Answer a call of the tool locally from the caller's own tenant's audit summaries."""
    policy, message = call.tenant.policy, call.message
    if (
        policy is None
        or not policy.recent_activity_records
        or message.method != "tools/call"
        or message.name != RECENT_ACTIVITY_TOOL
    ):
        return
    most = policy.recent_activity_records
    arguments = message.params.get("arguments")
    limit = arguments.get("limit") if isinstance(arguments, dict) else None
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= most:
        limit = most
    call.services.reports.run_now()  # the caller's own answered requests are all there
    records = []
    for record in await call.services.audit.recent(call.ctx.tenant, RECENT_PER_TENANT):
        if not policy.recent_activity_tenant_wide and (
            record.get("subject"),
            record.get("issuer"),
        ) != (call.ctx.subject, call.ctx.issuer):
            continue
        shown = {field: record.get(field) for field in _ACTIVITY_FIELDS}
        shown["name"] = _shown_name(call, record)
        records.append(shown)
        if len(records) >= limit:
            break
    result: JsonObject = {
        "content": [{"type": "text", "text": json.dumps(records, indent=1)}],
        "structuredContent": {"records": records},
        "isError": False,
    }
    if call.era is Era.MODERN:
        result["resultType"] = "complete"
    raw = dumps(result)
    call.record_result(raw)
    call.reply = web.Response(body=answer_bytes(message.id, raw), content_type="application/json")


def _shown_name(call: Request, record: JsonObject) -> str | None:
    """A record's name as the tool shows it: only names the tenant's catalog knows (tools, prompts,
    resource URIs listed or matching a template); what was refused or unknown is a fixed marker, so
    no client can plant text in a colleague's context through a name or a URI."""
    name, method = record.get("name"), record.get("method")
    if not isinstance(name, str):
        return None
    if record.get("outcome") not in ("ok", "error"):
        return HIDDEN_NAME
    if name == RECENT_ACTIVITY_TOOL:
        return name
    listing = _LISTINGS.get(method) if isinstance(method, str) else None
    if listing is not None:
        return name if call.tenant.catalog.cached(listing, name) is not None else HIDDEN_NAME
    if method != "resources/read":
        return HIDDEN_NAME
    policy = call.tenant.policy
    if policy is not None and foreign_uri(policy, call.ctx.tenant, name):
        return HIDDEN_NAME
    return name if call.tenant.catalog.resources.knows(name) else HIDDEN_NAME


def offer(call: Call, message: ServerMessage) -> ServerMessage | None:
    """The tool appears on the first page of the tenant's tools/list."""
    policy, request = call.tenant.policy, message.answers
    result = message.body.get("result")
    if (
        message.kind is ServerKind.ANSWER
        and policy is not None
        and policy.recent_activity_records
        and request is not None
        and request.method == "tools/list"
        and "cursor" not in request.params
        and isinstance(result, dict)
        and isinstance(result.get("tools"), list)
    ):
        tools = [*result["tools"], recent_activity_tool(policy.recent_activity_records)]
        message.body = {**message.body, "result": {**result, "tools": tools}}
    return message
