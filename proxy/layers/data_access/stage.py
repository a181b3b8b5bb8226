"""The data-access layer in the flow (layer 1): whatever reaches the upstream names only the
caller's tenant, and whatever comes back shows only what the caller's tenant may see.

    check_mirrored_headers   2026-07-28 tools/call: Mcp-Param-* headers agree with the body
    enforce_policy           the policy's decision (engine.evaluate): deny, rewrite, answer locally
    render_mirrored_headers  Mcp-Param-* for the upstream, from the body as the policy left it
    hidden_from              for the relay: whether an upstream's error text names another tenant's URI
    learn                    response hook: tools/prompts lists teach the catalog; list_changed resets it
    filter                   response hook: lists filtered, tenant arguments hidden from schemas
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import structlog
from aiohttp import web

from proxy.flow import Call, Request, ServerKind, ServerMessage
from proxy.layers.data_access.catalog import CatalogEntry, Listing, SessionRoute
from proxy.layers.data_access.engine import (
    Action,
    Decision,
    apply_rewrites,
    evaluate,
    evaluate_answer,
    filter_result,
    hides,
    mentions_foreign_uri,
)
from proxy.layers.data_access.schemas import SchemaIndex
from proxy.layers.sessions.stage import send_on_session_soon
from proxy.protocol.errors import PolicyDenied, UnknownResource
from proxy.protocol.headers import (
    PARAM_HEADER_PREFIX,
    arguments_of,
    check_param_headers,
    render_param_headers,
)
from proxy.protocol.jsonrpc import MessageKind, dumps
from proxy.types import Era

log = structlog.get_logger("proxy.layers.data_access")

_CATALOG_KIND: dict[str, Listing] = {"tools/call": "tools", "prompts/get": "prompts"}
_LISTS: dict[str, Listing] = {"tools/list": "tools", "prompts/list": "prompts"}
_LIST_CHANGED: dict[str, Listing] = {
    "notifications/tools/list_changed": "tools",
    "notifications/prompts/list_changed": "prompts",
}
_ENTRY = "data_access.entry"
_PARAM_HEADER_START = "\n" + PARAM_HEADER_PREFIX.lower()  # in the line-joined header names
# Answers whose results filter_lists narrows for the caller's tenant (engine.filter_result).
FILTERED = ("tools/list", "prompts/list", "resources/list", "resources/templates/list", "resources/read")


async def catalog_entry(call: Request, fetch: bool) -> CatalogEntry | None:
    """The tool or prompt a tools/call or prompts/get names (learned, or listed now when `fetch`)."""
    if _ENTRY in call.slots:
        entry: CatalogEntry | None = call.slots[_ENTRY]
        if entry is not None or not fetch:
            return entry
    kind = _CATALOG_KIND.get(call.message.method or "")
    name = call.message.name
    if kind is None or name is None:
        return None
    entry = call.tenant.catalog.cached(kind, name)
    if entry is None and fetch:
        session = call.session
        route = (
            SessionRoute(session.upstream_session_id, session.protocol_version)
            if session is not None and session.upstream_session_id is not None
            else None
        )
        entry = await call.tenant.catalog.lookup(kind, name, route)
    call.slots[_ENTRY] = entry
    return entry


def _sent_param_headers(call: Request) -> dict[str, list[str]]:
    headers = call.request.headers
    # Most requests send none: all names looked at once, at C speed (a name holds no line break,
    # so the prefix after one starts a name).
    if _PARAM_HEADER_START not in "\n" + "\n".join(headers.keys()).lower():
        return {}
    prefix = PARAM_HEADER_PREFIX.lower()
    sent: dict[str, list[str]] = {}
    for header_name, value in headers.items():
        lowered = header_name.lower()
        if lowered.startswith(prefix):
            sent.setdefault(lowered, []).append(value)
    return sent


async def check_mirrored_headers(call: Request) -> None:
    """Modern tools/call: the Mcp-Param-* headers the client sent must agree with its body."""
    if call.era is not Era.MODERN or call.message.method != "tools/call":
        return
    sent = _sent_param_headers(call)
    entry = await catalog_entry(call, fetch=bool(sent))
    if entry is None or entry.param_headers is None:
        return  # headers no declaration covers are simply not forwarded
    annotations = entry.param_headers
    policy = call.tenant.policy
    if policy is not None and policy.hide_from_schema:
        # A hidden tenant argument is one the client cannot know to mirror: the proxy owns it.
        annotations = tuple(
            a
            for a in annotations
            if a.path[-1] not in policy.tenant_argument_names or a.header.lower() in sent
        )
    check_param_headers(annotations, arguments_of(call.message), sent)


async def render_mirrored_headers(call: Request) -> None:
    """The Mcp-Param-* headers sent upstream, rendered from the body as the policy left it."""
    if call.era is not Era.MODERN or call.message.method != "tools/call":
        return
    entry = await catalog_entry(call, fetch=False)
    if entry is not None and entry.param_headers:
        call.upstream_headers.update(render_param_headers(entry.param_headers, arguments_of(call.message)))


def _record(call: Request, decision: Decision) -> None:
    """Count and log a denial or spoof attempt: names and rules only, never argument values."""
    rule = decision.rule or "policy"
    metrics = call.services.metrics
    if decision.spoof:
        metrics.spoof_attempts.labels(call.ctx.tenant, rule).inc()
        call.outcome = "spoof"
    if decision.action is not Action.REWRITE:
        metrics.policy_denials.labels(call.ctx.tenant, rule).inc()
        if not decision.spoof:
            call.outcome = "denied"
    log.warning(
        "policy_spoof" if decision.spoof else "policy_denied",
        tenant=call.ctx.tenant,
        subject_hash=call.subject_hash,
        method=call.message.method,
        rule=rule,
        argument=decision.argument,
        action=decision.action.value,
    )


async def enforce_policy(call: Request) -> None:
    """Layer 1: whatever reaches the upstream names only the caller's tenant."""
    message, policy = call.message, call.tenant.policy
    if policy is None or message.kind is MessageKind.NOTIFICATION:
        return
    if message.kind is MessageKind.RESPONSE:  # the client's answer to the upstream's question
        decision = evaluate_answer(policy, call.ctx.tenant, message.body)
        target = message.body
    else:
        schema: SchemaIndex | None = None
        name = message.name
        if message.method in _CATALOG_KIND and name is not None and policy.denying_rule(name) is None:
            entry = await catalog_entry(call, fetch=True)
            if entry is not None:
                schema = entry.schema
        decision = evaluate(policy, call.ctx.tenant, message.method, message.params, schema)
        target = message.body.setdefault("params", {}) if decision.action is Action.REWRITE else {}
    if decision.action is Action.FORWARD:
        return
    if decision.rule is not None:
        _record(call, decision)
    if decision.action is Action.DENY:
        refusal = PolicyDenied(f"Denied by policy: {decision.reason}", data={"rule": decision.rule})
        if message.kind is MessageKind.RESPONSE:  # the upstream's question is not left hanging
            send_on_session_soon(call, refusal.to_jsonrpc(message.id))
        raise refusal
    if decision.action is Action.HIDE_RESOURCE:
        raise UnknownResource.named(decision.uri)
    if decision.action is Action.ANSWER:
        result = dict(decision.answer or {})
        if call.era is Era.MODERN:
            result["resultType"] = "complete"
        body = {"jsonrpc": "2.0", "id": message.id, "result": result}
        call.reply = web.Response(body=dumps(body), content_type="application/json")
        return
    apply_rewrites(target, decision.rewrites)


def screen_notifications(call: Call, message: ServerMessage) -> ServerMessage | None:
    """A notification on any stream passes the tenant URI rules lists and reads pass: one naming
    (or mentioning) another tenant's resource is dropped, whatever the upstream sent it to."""
    policy = call.tenant.policy
    if policy is None or not mentions_foreign_uri(policy, call.ctx.tenant, message.body.get("params")):
        return message
    call.services.metrics.policy_denials.labels(call.ctx.tenant, "resources.tenant_uri_templates").inc()
    log.warning(
        "notification_dropped",
        tenant=call.ctx.tenant,
        method=(message.method or "")[:100],
        rule="resources.tenant_uri_templates",
    )
    return None


def hidden_from(call: Call) -> Callable[[str], bool]:
    """What the relay asks of an upstream's error text (its message, its `data.uri`): whether it
    names or mentions a resource the caller's tenant may not see, by the rules reads and lists pass."""
    policy = call.tenant.policy
    if policy is None:
        return _nothing_hidden
    return functools.partial(hides, policy, call.ctx.tenant)


def _nothing_hidden(text: str) -> bool:
    return False


def learn(call: Call, message: ServerMessage) -> ServerMessage | None:
    """The tenant's catalog follows its upstream: list results teach it, list_changed resets it."""
    catalog = call.tenant.catalog
    if message.kind is ServerKind.ANSWER and message.answers is not None:
        kind = _LISTS.get(message.answers.method or "")
        result = message.body.get("result")
        if kind is not None and isinstance(result, dict):
            catalog.learn(kind, result)
    elif message.kind is ServerKind.NOTIFICATION and message.method in _LIST_CHANGED:
        catalog.forget(_LIST_CHANGED[message.method])
    return message


def learn_resources(call: Call, message: ServerMessage) -> ServerMessage | None:
    """The tenant's known resources follow what its resource lists offered, after filtering (so
    a URI hidden from the tenant is never learned); list_changed resets them."""
    known = call.tenant.catalog.resources
    if message.kind is ServerKind.ANSWER and message.answers is not None:
        known.learn(message.answers.method or "", message.body.get("result"))
    elif message.kind is ServerKind.NOTIFICATION:
        known.forget()
    return message


RESOURCE_LISTS = ("resources/list", "resources/templates/list", "notifications/resources/list_changed")


def filter_lists(call: Call, message: ServerMessage) -> ServerMessage | None:
    """What the caller's tenant may see of a result (lists filtered, tenant arguments hidden)."""
    policy = call.tenant.policy
    result = message.body.get("result")
    if (
        message.kind is not ServerKind.ANSWER
        or policy is None
        or message.answers is None
        or not isinstance(result, dict)
    ):
        return message
    filtered = filter_result(policy, call.ctx.tenant, message.answers.method, result)
    if filtered is not result:
        message.body = {**message.body, "result": filtered}
    return message
