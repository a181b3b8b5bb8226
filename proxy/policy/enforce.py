"""Applying policy decisions: the request stage (deny, rewrite, answer) and the result filter."""

from __future__ import annotations

import json
from typing import Any

import structlog
from aiohttp import web

from proxy.catalog import Entry, Kind, SessionRoute
from proxy.errors import InvalidParams, PolicyDenied
from proxy.jsonrpc import Kind as MessageKind
from proxy.jsonrpc import answer_bytes, dumps
from proxy.policy.engine import Action, Decision, Path, declared_tenant_paths, evaluate, filter_result
from proxy.types import Era, Exchange, JsonObject

log = structlog.get_logger("proxy.policy")

_CATALOG_KIND: dict[str, Kind] = {"tools/call": "tools", "prompts/get": "prompts"}


async def catalog_entry(exchange: Exchange, fetch: bool) -> Entry | None:
    """The tool or prompt a tools/call or prompts/get names (learned, or listed now when `fetch`)."""
    message, tenant = exchange.message, exchange.tenant
    if exchange.catalog_entry is not None or message is None or tenant is None:
        return exchange.catalog_entry
    kind = _CATALOG_KIND.get(message.method or "")
    name = message.name
    if kind is None or name is None:
        return None
    entry = tenant.catalog.cached(kind, name)
    if entry is None and fetch:
        session = exchange.session
        route = (
            SessionRoute(session.upstream_session_id, session.protocol_version)
            if session is not None and session.upstream_session_id is not None
            else None
        )
        entry = await tenant.catalog.lookup(kind, name, route)
    exchange.catalog_entry = entry
    return entry


def _set(params: JsonObject, path: Path, value: Any) -> None:
    node: Any = params
    for part in path[:-1]:
        if isinstance(node, dict) and part not in node:
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


def _record(exchange: Exchange, decision: Decision) -> None:
    """Count and log a denial or spoof attempt: names and rules only, never argument values."""
    assert exchange.ctx is not None and exchange.message is not None
    rule = decision.rule or "policy"
    metrics = exchange.services.metrics
    if decision.spoof:
        metrics.spoof_attempts.labels(exchange.ctx.tenant, rule).inc()
        exchange.outcome = "spoof"
    if decision.action is not Action.REWRITE:
        metrics.policy_denials.labels(exchange.ctx.tenant, rule).inc()
        if not decision.spoof:
            exchange.outcome = "denied"
    log.warning(
        "policy_spoof" if decision.spoof else "policy_denied",
        tenant=exchange.ctx.tenant,
        subject_hash=exchange.subject_hash,
        method=exchange.message.method,
        rule=rule,
        argument=decision.argument,
        action=decision.action.value,
    )


async def enforce_policy(exchange: Exchange) -> None:
    """Layer 1: whatever reaches the upstream names only the caller's tenant."""
    message, tenant, ctx = exchange.message, exchange.tenant, exchange.ctx
    if message is None or tenant is None or ctx is None or tenant.policy is None:
        return
    if message.kind is not MessageKind.REQUEST:
        return
    policy = tenant.policy
    declared: tuple[Path, ...] = ()
    name = message.name
    if message.method == "tools/call" and name == RECENT_ACTIVITY_TOOL and policy.recent_activity_records:
        await _answer_recent_activity(exchange, policy.recent_activity_records)
        return
    if message.method in _CATALOG_KIND and name is not None and policy.denying_rule(name) is None:
        entry = await catalog_entry(exchange, fetch=True)
        if entry is not None:
            names = policy.tenant_argument_names
            known = entry.tenant_paths.get(names)
            if known is None:
                known = entry.tenant_paths[names] = declared_tenant_paths(entry.input_schema, names)
            declared = known
    decision = evaluate(policy, ctx.tenant, message.method, message.params, declared)
    if decision.action is Action.FORWARD:
        return
    if decision.rule is not None:
        _record(exchange, decision)
    if decision.action is Action.DENY:
        raise PolicyDenied(f"Denied by policy: {decision.reason}", data={"rule": decision.rule})
    if decision.action is Action.HIDE_RESOURCE:
        # Exactly what an upstream says of a resource it does not have: no existence probing.
        # (no data: an upstream's own -32602 reaches clients without its data, see sanitize_error)
        raise InvalidParams(
            f"Unknown resource: {decision.uri}", status=400 if exchange.era is Era.MODERN else 200
        )
    if decision.action is Action.ANSWER:
        result = dict(decision.answer or {})
        if exchange.era is Era.MODERN:
            result["resultType"] = "complete"
        body = {"jsonrpc": "2.0", "id": message.id, "result": result}
        exchange.reply = web.Response(body=dumps(body), content_type="application/json")
        return
    params = message.body.setdefault("params", {})
    for rewrite in decision.rewrites:
        _set(params, rewrite.path, rewrite.value)


def filter_answer(exchange: Exchange, result: JsonObject) -> JsonObject:
    """What the caller's tenant may see of a result (lists filtered, tenant arguments hidden)."""
    tenant, message, ctx = exchange.tenant, exchange.message, exchange.ctx
    if tenant is None or tenant.policy is None or message is None or ctx is None:
        return result
    filtered = filter_result(tenant.policy, ctx.tenant, message.method, result)
    if (
        message.method == "tools/list"
        and tenant.policy.recent_activity_records
        and "cursor" not in message.params
        and isinstance(filtered.get("tools"), list)
    ):
        offered = recent_activity_tool(tenant.policy.recent_activity_records)
        filtered = {
            **filtered,
            "tools": [*filtered["tools"], offered],
        }
    return filtered


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


async def _answer_recent_activity(exchange: Exchange, max_records: int) -> None:
    """Answer locally from the caller's own tenant's audit summaries, and nothing else."""
    assert exchange.ctx is not None and exchange.message is not None
    arguments = exchange.message.params.get("arguments")
    limit = arguments.get("limit") if isinstance(arguments, dict) else None
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= max_records:
        limit = max_records
    exchange.services.reports.run_now()  # the caller's own answered requests are all there
    records = [
        {field: record.get(field) for field in _ACTIVITY_FIELDS}
        for record in await exchange.services.audit.recent(exchange.ctx.tenant, limit)
    ]
    result: JsonObject = {
        "content": [{"type": "text", "text": json.dumps(records, indent=1)}],
        "structuredContent": {"records": records},
        "isError": False,
    }
    if exchange.era is Era.MODERN:
        result["resultType"] = "complete"
    raw = dumps(result)
    exchange.record_result(raw)
    exchange.reply = web.Response(
        body=answer_bytes(exchange.message.id, raw), content_type="application/json"
    )
