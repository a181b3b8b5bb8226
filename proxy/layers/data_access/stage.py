"""Applying policy decisions: the request stage (deny, rewrite, answer) and the result filter."""

from __future__ import annotations

import json
from typing import Any

import structlog
from aiohttp import web

from proxy.layers.containment.request_state import RequestState
from proxy.layers.data_access.catalog import Entry, Kind, SessionRoute
from proxy.layers.data_access.engine import Action, Decision, Path, evaluate, filter_result
from proxy.layers.data_access.policy import DEFAULT_CLIENT_CAPABILITIES, ClientCapabilities
from proxy.layers.data_access.schemas import SchemaIndex
from proxy.protocol.errors import InvalidParams, PolicyDenied
from proxy.protocol.headers import CLIENT_CAPABILITIES_META
from proxy.protocol.jsonrpc import Kind as MessageKind
from proxy.protocol.jsonrpc import answer_bytes, dumps
from proxy.types import Era, Exchange, JsonObject

log = structlog.get_logger("proxy.layers.data_access")

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
    schema: SchemaIndex | None = None
    name = message.name
    if message.method == "tools/call" and name == RECENT_ACTIVITY_TOOL and policy.recent_activity_records:
        await _answer_recent_activity(exchange, policy.recent_activity_records)
        return
    if message.method in _CATALOG_KIND and name is not None and policy.denying_rule(name) is None:
        entry = await catalog_entry(exchange, fetch=True)
        if entry is not None:
            schema = entry.schema
    decision = evaluate(policy, ctx.tenant, message.method, message.params, schema)
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


# --- client capabilities: what the upstream may learn of, and ask from, the client ---------------


def capabilities_of(exchange: Exchange) -> ClientCapabilities:
    tenant = exchange.tenant
    if tenant is None or tenant.policy is None:
        return DEFAULT_CLIENT_CAPABILITIES  # (fail closed: no policy still means no client roots)
    return tenant.policy.client_capabilities


async def enforce_client_capabilities(exchange: Exchange) -> None:
    """The client's capabilities as the upstream sees them (initialize in the handshake era, every
    request's _meta in 2026-07-28), and its roots list_changed dropped when roots are not its own."""
    message = exchange.message
    if message is None or exchange.tenant is None:
        return
    capabilities = capabilities_of(exchange)
    if message.kind is MessageKind.NOTIFICATION:
        if message.method == "notifications/roots/list_changed" and capabilities.roots != "allow":
            exchange.reply = web.Response(status=202)
        return
    if message.kind is not MessageKind.REQUEST or not isinstance(message.body.get("params"), dict):
        return
    params = message.body["params"]
    if message.method == "initialize" and "capabilities" in params:
        params["capabilities"] = capabilities.filter(params["capabilities"])
    meta = params.get("_meta")
    if exchange.era is Era.MODERN and isinstance(meta, dict) and CLIENT_CAPABILITIES_META in meta:
        params["_meta"] = {
            **meta,
            CLIENT_CAPABILITIES_META: capabilities.filter(meta[CLIENT_CAPABILITIES_META]),
        }


def _record_capability(exchange: Exchange, method: str, capabilities: ClientCapabilities) -> str:
    rule = f"client_capabilities.{capabilities.rule_for(method)}"
    tenant = exchange.ctx.tenant if exchange.ctx is not None else "?"
    exchange.services.metrics.policy_denials.labels(tenant, rule).inc()
    log.warning(
        "policy_denied",
        tenant=tenant,
        subject_hash=exchange.subject_hash,
        method=method,
        rule=rule,
        direction="server_to_client",
    )
    return rule


def answer_for_upstream(exchange: Exchange, request: JsonObject) -> JsonObject | None:
    """A server-to-client request the client may not see (handshake era): the proxy's own answer to
    the upstream (the policy's roots, or an error), or None when it may reach the client."""
    method = request.get("method")
    capabilities = capabilities_of(exchange)
    if not isinstance(method, str) or capabilities.allows(method):
        return None
    if method == "roots/list":
        if capabilities.roots == "deny":
            _record_capability(exchange, method, capabilities)
        tenant = exchange.ctx.tenant if exchange.ctx is not None else ""
        return {
            "jsonrpc": "2.0",
            "id": request.get("id"),
            "result": {"roots": capabilities.roots_for(tenant)},
        }
    _record_capability(exchange, method, capabilities)
    error = {"code": -32601, "message": f"Method not found: the client does not offer {method}"}
    return {"jsonrpc": "2.0", "id": request.get("id"), "error": error}


def settle_input_requests(exchange: Exchange, result: JsonObject) -> JsonObject:
    """A 2026-07-28 input_required result as the client gets it: the requests the policy answers
    itself (roots) taken out and their answers sealed into requestState with the caller, the request
    and the keys the client is asked to answer; a request the policy denies refuses the whole call."""
    ctx, message = exchange.ctx, exchange.message
    assert ctx is not None and message is not None
    capabilities = capabilities_of(exchange)
    requests = result.get("inputRequests")
    kept: JsonObject = {}
    answers: JsonObject = {}
    for key, request in requests.items() if isinstance(requests, dict) else ():
        method = request.get("method") if isinstance(request, dict) else None
        if method == "roots/list" and capabilities.roots != "allow":
            if capabilities.roots == "deny":
                _record_capability(exchange, method, capabilities)
            answers[key] = {"roots": capabilities.roots_for(ctx.tenant)}
        elif isinstance(method, str) and not capabilities.allows(method):
            rule = _record_capability(exchange, method, capabilities)
            exchange.outcome = "denied"
            raise PolicyDenied(
                f"Denied by policy: the upstream asked the client for {method}, which this tenant's "
                f"policy does not allow (rule {rule})",
                data={"rule": rule},
            )
        else:
            kept[str(key)] = request
    upstream_state = result.get("requestState")
    state = RequestState(
        message.method or "",
        message.name,
        upstream_state if isinstance(upstream_state, str) else None,
        tuple(kept),
        answers,
    )
    settled = {**result, "requestState": exchange.services.request_states.seal(ctx, state)}
    if isinstance(requests, dict):
        if kept:
            settled["inputRequests"] = kept
        else:
            del settled["inputRequests"]  # the client may retry at once, with the requestState
    return settled
