"""What the upstream may learn of, and ask from, the client (policy `client_capabilities`), and the
MRTR request state that carries a multi-round-trip request through the client (2026-07-28).

    open_request_state   check: a retry's requestState must be the one sealed to this caller and
                         request; the upstream gets its own state back, and the inputResponses the
                         client was asked for plus the proxy's own answers
    restrict             check: the client's capabilities as the upstream sees them (initialize,
                         and every 2026-07-28 request's _meta; extensions as in extensions.py);
                         roots list_changed dropped; a client's trace context and baggage in
                         _meta dropped
    server_requests      response hook: a server-to-client request the policy does not let through
                         is answered by the proxy itself (roots) or refused, never relayed
    settle_input         response hook: an input_required result's requests handled the same way,
                         and its requestState sealed
"""

from __future__ import annotations

import structlog
from aiohttp import web

from proxy.flow import Call, Request, ServerKind, ServerMessage
from proxy.layers.containment.extensions import allowed, only_allowed
from proxy.layers.containment.request_state import RequestState
from proxy.layers.data_access.policy import DEFAULT_CLIENT_CAPABILITIES, ClientCapabilities
from proxy.layers.sessions.stage import send_on_session_soon
from proxy.protocol.errors import InvalidParams, PolicyDenied
from proxy.protocol.headers import CLIENT_CAPABILITIES_META
from proxy.protocol.jsonrpc import MessageKind
from proxy.types import Era, JsonObject

# W3C trace context and baggage a client may put in `_meta` (SDK servers extract them with the
# default propagators): what the upstream's trace is part of, and which baggage (`tenant=...`) every
# service behind it receives, is never the client's to choose. With tracing on, the proxy's own
# `traceparent` goes upstream (ops/tracing.py, which reads a trusted client's context before this).
CLIENT_TRACE_META = frozenset({"traceparent", "tracestate", "baggage"})

log = structlog.get_logger("proxy.layers.containment")


def capabilities_of(call: Call) -> ClientCapabilities:
    policy = call.tenant.policy
    if policy is None:
        return DEFAULT_CLIENT_CAPABILITIES  # (fail closed: no policy still means no client roots)
    return policy.client_capabilities


async def open_request_state(call: Request) -> None:
    """A multi-round-trip retry is forwarded only with a requestState issued to this same caller for
    this same request; its inputResponses are the ones the client was asked for, plus the proxy's
    own (a roots/list the policy answers), and the upstream gets its own requestState back."""
    message = call.message
    if message.kind is not MessageKind.REQUEST:
        return
    params = message.params
    if "requestState" not in params:
        if "inputResponses" in params and message.method != "tasks/update":  # (a task's: its id binds it)
            raise InvalidParams(
                "Invalid params: inputResponses answer an input_required result; send its requestState too"
            )
        return
    state = call.services.request_states.open(
        call.ctx, message.method or "", message.name, params["requestState"]
    )
    if state is None:
        raise InvalidParams(
            "Invalid params: requestState was not issued to this caller for this request, or has expired; "
            "start the request again"
        )
    if state.upstream_state is None:
        del params["requestState"]
    else:
        params["requestState"] = state.upstream_state
    given = params.get("inputResponses")
    responses = {k: v for k, v in given.items() if k in state.expected} if isinstance(given, dict) else {}
    responses.update(state.answers)
    if responses or "inputResponses" in params:
        params["inputResponses"] = responses


async def restrict(call: Request) -> None:
    """The client's capabilities as the upstream sees them (initialize in the handshake era, every
    request's _meta in 2026-07-28), and its roots list_changed dropped when roots are not its own."""
    message = call.message
    capabilities = capabilities_of(call)
    if message.kind is MessageKind.NOTIFICATION:
        if message.method == "notifications/roots/list_changed" and capabilities.roots != "allow":
            call.reply = web.Response(status=202)
        return
    params = message.body.get("params")
    if message.kind is not MessageKind.REQUEST or not isinstance(params, dict):
        return
    meta = params.get("_meta")
    if isinstance(meta, dict) and not CLIENT_TRACE_META.isdisjoint(meta):
        meta = params["_meta"] = {key: value for key, value in meta.items() if key not in CLIENT_TRACE_META}
    if message.method == "initialize" and "capabilities" in params:
        params["capabilities"] = only_allowed(capabilities.filter(params["capabilities"]), allowed(call))
    if call.era is Era.MODERN and isinstance(meta, dict) and CLIENT_CAPABILITIES_META in meta:
        declared = capabilities.filter(meta[CLIENT_CAPABILITIES_META])
        params["_meta"] = {**meta, CLIENT_CAPABILITIES_META: only_allowed(declared, allowed(call))}


def _record(call: Call, method: str, capabilities: ClientCapabilities) -> str:
    rule = f"client_capabilities.{capabilities.rule_for(method)}"
    call.services.metrics.policy_denials.labels(call.ctx.tenant, rule).inc()
    log.warning(
        "policy_denied",
        tenant=call.ctx.tenant,
        subject_hash=call.subject_hash,
        method=method,
        rule=rule,
        direction="server_to_client",
    )
    return rule


def own_answer(call: Call, request: JsonObject) -> JsonObject | None:
    """The proxy's own answer to a server-to-client request the client may not see (the policy's
    roots, or an error), or None when it may reach the client."""
    method = request.get("method")
    capabilities = capabilities_of(call)
    if not isinstance(method, str) or capabilities.allows(method):
        return None
    if method == "roots/list":
        if capabilities.roots == "deny":
            _record(call, method, capabilities)
        roots = capabilities.roots_for(call.ctx.tenant)
        return {"jsonrpc": "2.0", "id": request.get("id"), "result": {"roots": roots}}
    _record(call, method, capabilities)
    error = {"code": -32601, "message": f"Method not found: the client does not offer {method}"}
    return {"jsonrpc": "2.0", "id": request.get("id"), "error": error}


def server_requests(call: Call, message: ServerMessage) -> ServerMessage | None:
    """A server-to-client request the policy answers itself never reaches the client."""
    if message.kind is not ServerKind.SERVER_REQUEST:
        return message
    answer = own_answer(call, message.body)
    if answer is None:
        return message
    send_on_session_soon(call, answer)
    return None


def settle_input(call: Call, message: ServerMessage) -> ServerMessage | None:
    """A 2026-07-28 input_required result as the client gets it: the requests the policy answers
    itself (roots) taken out and their answers sealed into requestState with the caller, the request
    and the keys the client is asked to answer; a request the policy denies refuses the whole call."""
    result = message.body.get("result")
    request = message.answers
    if (
        message.kind is not ServerKind.ANSWER
        or request is None
        or not isinstance(result, dict)
        or result.get("resultType") != "input_required"
    ):
        return message
    capabilities = capabilities_of(call)
    requests = result.get("inputRequests")
    kept: JsonObject = {}
    answers: JsonObject = {}
    for key, asked in requests.items() if isinstance(requests, dict) else ():
        method = asked.get("method") if isinstance(asked, dict) else None
        if method == "roots/list" and capabilities.roots != "allow":
            if capabilities.roots == "deny":
                _record(call, method, capabilities)
            answers[key] = {"roots": capabilities.roots_for(call.ctx.tenant)}
        elif isinstance(method, str) and not capabilities.allows(method):
            rule = _record(call, method, capabilities)
            call.outcome = "denied"
            refusal = PolicyDenied(
                f"Denied by policy: the upstream asked the client for {method}, which this tenant's "
                f"policy does not allow (rule {rule})",
                data={"rule": rule},
            )
            call.error_code = refusal.code
            message.body = refusal.to_jsonrpc(request.id)
            return message
        else:
            kept[str(key)] = asked
    upstream_state = result.get("requestState")
    state = RequestState(
        request.method or "",
        request.name,
        upstream_state if isinstance(upstream_state, str) else None,
        tuple(kept),
        answers,
    )
    settled = {**result, "requestState": call.services.request_states.seal(call.ctx, state)}
    if isinstance(requests, dict):
        if kept:
            settled["inputRequests"] = kept
        else:
            del settled["inputRequests"]  # the client may retry at once, with the requestState
    message.body = {**message.body, "result": settled}
    return message
