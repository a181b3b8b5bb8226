"""`proxy_recent_activity`: a tool the proxy itself offers (policy `recent_activity`), answering from
the caller's own tenant's audit summaries and nothing else.

    answer         check: a call of the tool is answered here, never forwarded
    offer          response hook: the first page of tools/list lists the tool
"""

from __future__ import annotations

import json

from aiohttp import web

from proxy.flow import Call, Request, ServerKind, ServerMessage
from proxy.protocol.jsonrpc import answer_bytes, dumps
from proxy.types import Era, JsonObject

RECENT_ACTIVITY_TOOL = "proxy_recent_activity"
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
    records = [
        {field: record.get(field) for field in _ACTIVITY_FIELDS}
        for record in await call.services.audit.recent(call.ctx.tenant, limit)
    ]
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
