"""The static checks: what a tenant's upstream declares (through the proxy) against its policy.

    open-tenant-argument      a tool or prompt argument, at any depth, that looks tenant- or
                              owner-identifying and that tenant_arguments.names does not cover
    open-tenant-uri-template  a resource template with such a variable, not made tenant-scoped
                              by resources.tenant_uri_templates
    foreign-resource-listed   a resource the tenant is offered whose URI names another tenant
    free-form-argument        an argument of any shape (an object of any keys, a JSON string):
                              the proxy can only check the keys it knows by name inside it
    shared-history-tool       a tool that looks like it reads records of every caller
    cached-caller-specific    a tools/call cache TTL on a tool whose result looks caller-specific
                              (the cache is per tenant: the next user of the tenant gets it)
    stdio-client-capability   roots or sampling allowed for a stdio upstream, whose processes
                              serve every session of the tenant

Nothing here does I/O: each check reads a TenantView and returns findings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from proxy.layers.containment.recent_activity import RECENT_ACTIVITY_TOOL
from proxy.verify.arguments import declared_arguments
from proxy.verify.inventory import TenantView
from proxy.verify.report import Finding, Severity
from proxy.verify.snippets import (
    cache_fix,
    capabilities_fix,
    deny_fix,
    flow,
    names_fix,
    policy_template,
    template_covered,
    template_fix,
    tenant_variable,
)
from proxy.verify.words import caller_hint, history_hint

Check = Callable[[TenantView, tuple[str, ...]], list[Finding]]


def _described(item: dict[str, Any]) -> str | None:
    text = item.get("description")
    return text if isinstance(text, str) else None


def _prompt_schema(prompt: dict[str, Any]) -> dict[str, Any]:
    """A prompt's arguments as the flat string schema the proxy checks them with."""
    properties = {
        a["name"]: {"type": "string", "description": a.get("description") or ""}
        for a in prompt.get("arguments") or []
        if isinstance(a, dict) and isinstance(a.get("name"), str)
    }
    return {"type": "object", "properties": properties}


def callables(view: TenantView) -> Iterable[tuple[str, str, dict[str, Any]]]:
    """(kind, name, input schema) of every tool and prompt the tenant is offered."""
    for tool in view.inventory.tools:
        if isinstance(tool.get("name"), str) and tool["name"] != RECENT_ACTIVITY_TOOL:
            yield "tool", tool["name"], tool.get("inputSchema") or {}
    for prompt in view.inventory.prompts:
        if isinstance(prompt.get("name"), str):
            yield "prompt", prompt["name"], _prompt_schema(prompt)


def open_tenant_arguments(view: TenantView, others: tuple[str, ...]) -> list[Finding]:
    findings = []
    for kind, name, schema in callables(view):
        for argument in declared_arguments(schema):
            hint = argument.tenant_hint()
            if hint is None or argument.name in view.covered:
                continue
            why, by_name = hint
            evidence = [f"{kind} {name} declares {argument.path!r}: {why}"]
            if argument.refs:
                evidence.append(f"reached through $ref {', '.join(argument.refs)}")
            if argument.description:
                evidence.append(f"described as {argument.description[:160]!r}")
            covered = ", ".join(sorted(view.covered)) or "nothing (no policy)"
            evidence.append(f"tenant_arguments.names covers {covered}")
            if view.shares_upstream_with:
                evidence.append(
                    f"the upstream ({view.where}) also serves {', '.join(view.shares_upstream_with)}"
                )
            findings.append(
                Finding(
                    "open-tenant-argument",
                    Severity.HIGH if by_name else Severity.MEDIUM,
                    view.tenant,
                    f"{name}:{argument.path}",
                    f"{kind.capitalize()} {name} takes {argument.path!r}, which looks tenant-identifying, "
                    "and the proxy neither checks nor fills it in: a client can name another tenant there.",
                    tuple(evidence),
                    names_fix(view, [argument.name]),
                    view.fix_file,
                )
            )
    return findings


def open_tenant_templates(view: TenantView, others: tuple[str, ...]) -> list[Finding]:
    findings = []
    for item in view.inventory.templates:
        template = item.get("uriTemplate")
        if not isinstance(template, str):
            continue
        variable = tenant_variable(template)
        if variable is None or template_covered(view.policy, template, variable):
            continue
        findings.append(
            Finding(
                "open-tenant-uri-template",
                Severity.HIGH,
                view.tenant,
                template,
                f"Resource template {template} takes {{{variable}}}, which looks tenant-identifying, and no "
                "resources.tenant_uri_templates entry makes it the caller's: any tenant's URI can be read.",
                (f"template {template!r} ({item.get('name', 'unnamed')}) offered to {view.tenant}",),
                template_fix(
                    view,
                    policy_template(template, variable),
                    f"{template} with {{tenant}} for {{{variable}}}",
                ),
                view.fix_file,
            )
        )
    return findings


def foreign_resources(view: TenantView, others: tuple[str, ...]) -> list[Finding]:
    findings = []
    for item in view.inventory.resources:
        uri = item.get("uri")
        if not isinstance(uri, str):
            continue
        segments = set(uri.replace("?", "/").replace("#", "/").replace(":", "/").split("/"))
        for other in others:
            if other in segments:
                findings.append(
                    Finding(
                        "foreign-resource-listed",
                        Severity.HIGH,
                        view.tenant,
                        uri,
                        f"resources/list offers {view.tenant} a resource whose URI names tenant {other}.",
                        (f"resources/list for {view.tenant} includes {uri!r}",),
                        template_fix(view, None, f"the template of {uri}, with {{tenant}} where {other} is"),
                        view.fix_file,
                    )
                )
    return findings


def free_form_arguments(view: TenantView, others: tuple[str, ...]) -> list[Finding]:
    findings = []
    for kind, name, schema in callables(view):
        loose = [a for a in declared_arguments(schema) if a.free_form is not None]
        if not loose:
            continue
        fix = f"tenant_arguments:\n  names: {_names_comment(view)}   # add keys in there that name an owner\n"
        findings.append(
            Finding(
                "free-form-argument",
                Severity.LOW,
                view.tenant,
                f"{name}:{','.join(a.path for a in loose)}",
                f"{kind.capitalize()} {name} takes documents of any shape: the proxy checks only the keys "
                "tenant_arguments.names lists inside them, whatever else the upstream reads there.",
                tuple(f"{a.path!r} {a.free_form}" for a in loose),
                fix,
                view.fix_file,
            )
        )
    return findings


def _names_comment(view: TenantView) -> str:
    return flow(view.spec.tenant_arguments.names if view.policy is not None else [])


def shared_history_tools(view: TenantView, others: tuple[str, ...]) -> list[Finding]:
    findings = []
    for tool in view.inventory.tools:
        name = tool.get("name")
        if not isinstance(name, str) or name == RECENT_ACTIVITY_TOOL:
            continue
        why = history_hint(name, _described(tool))
        if why is None:
            continue
        findings.append(
            Finding(
                "shared-history-tool",
                Severity.MEDIUM,
                view.tenant,
                name,
                f"Tool {name} looks like it reads recent or shared records; unless its upstream keeps them "
                "per tenant, one tenant's activity reaches another's context.",
                (f"{why}", f"described as {(_described(tool) or '')[:160]!r}"),
                deny_fix(view, name),
                view.fix_file,
            )
        )
    return findings


def cached_caller_specific(view: TenantView, others: tuple[str, ...]) -> list[Finding]:
    findings: list[Finding] = []
    if view.policy is None:
        return findings
    for name, ttl in view.policy.cache_ttl_seconds.items():
        tool = view.inventory.tool(name)
        why = caller_hint(name, _described(tool) if tool is not None else None)
        if why is None:
            continue
        findings.append(
            Finding(
                "cached-caller-specific",
                Severity.MEDIUM,
                view.tenant,
                name,
                f"tools.cache_ttl_seconds caches {name} for {ttl:g} s per tenant, and its result looks "
                "specific to the caller: the tenant's next caller gets the first caller's answer.",
                (why, "tools/call results are cached per tenant, not per user or session"),
                cache_fix(view, name),
                view.fix_file,
            )
        )
    return findings


def stdio_client_capabilities(view: TenantView, others: tuple[str, ...]) -> list[Finding]:
    if not view.stdio:
        return []
    capabilities = view.policy.client_capabilities if view.policy is not None else None
    roots = capabilities.roots if capabilities is not None else "deny"
    shared_roots = (
        roots == "list"
        and capabilities is not None
        and not any("{tenant}" in uri for uri in capabilities.root_uris)
    )
    sampling = capabilities.sampling if capabilities is not None else True
    evidence = [f"tenants.{view.tenant}.upstream.command: {' '.join(view.config.upstream.command or ())}"]
    if roots == "allow":
        evidence.append("client_capabilities.roots: allow (a server such as server-filesystem adopts them)")
    if shared_roots:
        evidence.append(
            "client_capabilities.roots lists URIs without {tenant}: every tenant gets the same roots"
        )
    if sampling:
        evidence.append("client_capabilities.sampling: allow (the default)")
    if len(evidence) == 1:
        return []
    return [
        Finding(
            "stdio-client-capability",
            Severity.HIGH if roots == "allow" else Severity.MEDIUM,
            view.tenant,
            "client_capabilities",
            "A stdio upstream may learn of, or ask, the client for more than this tenant's own: its "
            "process serves the tenant's sessions and adopts what one client offers.",
            tuple(evidence),
            capabilities_fix(roots == "allow" or shared_roots, sampling),
            view.fix_file,
        )
    ]


CHECKS: tuple[Check, ...] = (
    open_tenant_arguments,
    open_tenant_templates,
    foreign_resources,
    free_form_arguments,
    shared_history_tools,
    cached_caller_specific,
    stdio_client_capabilities,
)


def static_findings(view: TenantView, others: tuple[str, ...]) -> list[Finding]:
    """Every static check's findings for one tenant; `others`: the other tenants' ids."""
    return [finding for check in CHECKS for finding in check(view, others)]
