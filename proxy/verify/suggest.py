"""`policy suggest`: a commented policy derived from what a tenant's upstream declares.

The upstream is reached directly, the way the proxy reaches it (the tenant's own credentials, or
its stdio process), so tenant arguments a policy already hides are seen too. What the tenant's
current policy says is kept; what the upstream shows is added: tenant arguments found by name,
`hide_from_schema`, URI templates with a tenant variable, and for stdio upstreams no roots and no
sampling. Guesses too weak to act on (descriptions, shapes, tool names) are comments to review.
"""

from __future__ import annotations

import json
from collections import defaultdict

from proxy.config import ProxyConfig
from proxy.layers.containment.recent_activity import RECENT_ACTIVITY_TOOL
from proxy.tenants.directory import build_upstream
from proxy.verify.arguments import declared_arguments
from proxy.verify.client import McpClient
from proxy.verify.inventory import TenantView, take_inventory
from proxy.verify.snippets import flow, policy_template, tenant_variable
from proxy.verify.static import callables
from proxy.verify.words import caller_hint, history_hint


async def inspect_upstream(config: ProxyConfig, tenant: str, request_timeout: float) -> TenantView:
    """The tenant's view, its inventory taken from its upstream directly."""
    view = TenantView.of(config, tenant)
    upstream = build_upstream(tenant, view.config)
    client = McpClient(upstream, f"tenant {tenant}'s upstream ({view.where})", request_timeout)
    try:
        await client.connect()
        view.inventory = await take_inventory(client)
    finally:
        await client.close()
    return view


def suggest_policy(view: TenantView) -> str:
    """The suggested policy, as commented YAML that load_policy accepts."""
    spec = view.spec if view.policy is not None else None
    by_name: dict[str, list[str]] = defaultdict(list)
    by_description: list[str] = []
    loose: list[str] = []
    for kind, name, schema in callables(view):
        for argument in declared_arguments(schema):
            hint = argument.tenant_hint()
            place = f"{kind} {name}"
            if argument.path != argument.name:
                via = f", through {argument.refs[-1]}" if argument.refs else ""
                place += f" ({argument.path}{via})"
            if hint is not None and hint[1]:
                by_name[argument.name].append(place)
            elif hint is not None:
                by_description.append(f"{argument.path}: {kind} {name} ({hint[0]})")
            if argument.free_form is not None:
                loose.append(f"{argument.path}: {kind} {name} ({argument.free_form})")
    names = list(spec.tenant_arguments.names) if spec is not None else []
    names.extend(name for name in sorted(by_name) if name not in names)
    where, inventory = view.where, view.inventory
    lines = [
        f"# Policy for tenant {view.tenant}, suggested by `mcp-tenant-proxy policy suggest` from what its",
        f"# upstream ({where}) declares: {inventory.summary()}.",
        f"# Review it, save it as {view.policy_file or 'policies/NAME.yaml'}"
        + ("" if view.policy_file else f" and set tenants.{view.tenant}.policy: NAME")
        + ".",
        "tenant_arguments:",
        "  # Tenant-identifying arguments (checked at any depth, filled in with the caller's tenant):",
        *(f"  #   {name}: {'; '.join(places)}" for name, places in sorted(by_name.items())),
        f"  names: {flow(names or ['tenant_id'])}",
        f"  on_mismatch: {spec.tenant_arguments.on_mismatch if spec is not None else 'reject'}",
        "  hide_from_schema: true",
    ]
    if spec is not None and spec.tenant_arguments.json_document_tools:
        lines.append(f"  json_document_tools: {flow(spec.tenant_arguments.json_document_tools)}")
    _comments(lines, "Described as naming a tenant; add to names if they do:", by_description)
    _comments(lines, "Of any shape: the proxy checks only the names above inside them:", loose)
    lines.extend(_tools(view))
    lines.extend(_resources(view))
    lines.extend(_capabilities(view))
    if spec is not None and spec.recent_activity.enabled:
        lines.append(f"recent_activity: {{enabled: true, max_records: {spec.recent_activity.max_records}}}")
    return "\n".join(lines) + "\n"


def _comments(lines: list[str], heading: str, items: list[str]) -> None:
    if items:
        lines.append(f"  # {heading}")
        lines.extend(f"  #   {item}" for item in items)


def _tools(view: TenantView) -> list[str]:
    spec = view.spec.tools
    lines = ["tools:", f"  allow: {flow(spec.allow)}", f"  deny: {flow(spec.deny)}"]
    history = [
        f"{tool['name']} ({why})"
        for tool in view.inventory.tools
        if isinstance(tool.get("name"), str) and tool["name"] != RECENT_ACTIVITY_TOOL
        and (why := history_hint(tool["name"], tool.get("description"))) is not None
    ]  # fmt: skip
    if history:
        lines.append(
            "  # Look like they read shared records: deny them unless the upstream keeps them per tenant"
        )
        lines.append("  # (recent_activity: {enabled: true} offers each tenant its own activity instead):")
        lines.extend(f"  #   {item}" for item in history)
    ttls = {}
    for name, ttl in spec.cache_ttl_seconds.items():
        tool = view.inventory.tool(name)
        why = caller_hint(name, tool.get("description") if tool is not None else None)
        if why is None:
            ttls[name] = ttl
        else:
            lines.append(f"  # {name} is no longer cached: its result looks caller-specific ({why})")
    if ttls:
        lines.append(f"  cache_ttl_seconds: {json.dumps(ttls)}")
    return lines


def _resources(view: TenantView) -> list[str]:
    templates = list(view.spec.resources.tenant_uri_templates)
    lines = []
    for item in view.inventory.templates:
        template = item.get("uriTemplate")
        variable = tenant_variable(template) if isinstance(template, str) else None
        if not isinstance(template, str) or variable is None:
            continue
        scoped = policy_template(template, variable)
        if scoped is None:
            lines.append(f"  #   {template}: cannot be written with {{tenant}} for {{{variable}}}; review it")
        elif scoped not in templates:
            templates.append(scoped)
            lines.append(f"  #   {json.dumps(scoped)}: the upstream's {template}")
    if not templates and not lines:
        return []
    heading = (
        ["  # URI templates with a tenant variable: a URI must name the caller's tenant there"]
        if lines
        else []
    )
    return ["resources:", *heading, *lines, f"  tenant_uri_templates: {flow(templates)}"]


def _capabilities(view: TenantView) -> list[str]:
    spec = view.spec.client_capabilities
    roots = spec.roots if isinstance(spec.roots, str) else flow(spec.roots)
    sampling = spec.sampling
    lines = ["client_capabilities:"]
    if view.stdio:
        lines.append(
            "  # stdio: the tenant's process serves all its sessions; it gets no client's roots or model"
        )
        if roots == "allow" or (
            isinstance(spec.roots, tuple) and not any("{tenant}" in r for r in spec.roots)
        ):
            roots = "deny"
        sampling = "deny"
    lines.extend([f"  roots: {roots}", f"  sampling: {sampling}", f"  elicitation: {spec.elicitation}"])
    return lines
