"""MCP extensions (SEP-2133): the proxy offers clients only what it enforces.

An extension adds methods, result types or fields the proxy would pass on unexamined: tasks, for
one, hand out ids that must be bound to their caller (layers/sessions/tasks.py). So an extension
the proxy does not enforce is removed from what either side declares, in both eras:

    server/discover and initialize results   capabilities.extensions  (what the client is offered)
    initialize params, a 2026-07-28 request's _meta clientCapabilities  (what the upstream may use)

unless the tenant's policy names it in `extensions.allow` (an extension that works through methods
the proxy already checks, such as io.modelcontextprotocol/ui). Methods the proxy does not know
stay refused either way (protocol/jsonrpc.py's tables).
"""

from __future__ import annotations

from typing import Any, Final

from proxy.flow import Call, ServerKind, ServerMessage

TASKS_EXTENSION: Final = "io.modelcontextprotocol/tasks"
ENFORCED: Final = frozenset({TASKS_EXTENSION})
OFFERING_METHODS: Final = ("server/discover", "initialize")


def allowed(call: Call) -> frozenset[str]:
    policy = call.tenant.policy
    return ENFORCED | policy.extensions_allowed if policy is not None else ENFORCED


def only_allowed(capabilities: Any, extensions: frozenset[str]) -> Any:
    """Capabilities without the extensions not in `extensions` (the same object when none go)."""
    if not isinstance(capabilities, dict):
        return capabilities
    declared = capabilities.get("extensions")
    if not isinstance(declared, dict):
        return capabilities
    kept = {name: value for name, value in declared.items() if name in extensions}
    if len(kept) == len(declared):
        return capabilities
    return {**capabilities, "extensions": kept}


def offer(call: Call, message: ServerMessage) -> ServerMessage | None:
    """Response hook (server/discover, initialize): the server's capabilities as the client may see
    them, the extensions the proxy does not enforce (or the policy allow) left out."""
    result = message.body.get("result")
    if message.kind is not ServerKind.ANSWER or not isinstance(result, dict):
        return message
    capabilities = result.get("capabilities")
    offered = only_allowed(capabilities, allowed(call))
    if offered is not capabilities:
        message.body = {**message.body, "result": {**result, "capabilities": offered}}
    return message
