"""Policy snippets that fix a finding, written against the policy as it is, and URI templates as a
policy names them.

A snippet shows whole values (the list of names with the new one added, not the new one alone), so
an operator can paste it over the section it names. Lists are written in YAML's flow style with
JSON strings, which any YAML reader takes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Final

from proxy.layers.data_access.engine import uri_tenant
from proxy.layers.data_access.policy import Policy, compile_uri_template
from proxy.verify.inventory import TenantView
from proxy.verify.words import tenant_word

# RFC 6570 expressions: an optional operator and one or more variables (with :N or * modifiers).
EXPRESSION: Final = re.compile(r"\{([+#./;?&]?)([^{}]*)\}")
PROBE_TENANT: Final = "verify-probe-tenant"
_SAMPLE_BY_OPERATOR: Final = {
    "": "x",
    "+": "x",
    "#": "#x",
    ".": ".x",
    "/": "/x",
    ";": ";x=x",
    "?": "?x=x",
    "&": "&x=x",
}


def flow(items: Iterable[str]) -> str:
    return "[" + ", ".join(json.dumps(item, ensure_ascii=False) for item in items) + "]"


def variables(template: str) -> list[tuple[str, str]]:
    """(operator, variable) of every variable of a URI template, in order."""
    found = []
    for operator, names in EXPRESSION.findall(template):
        for raw in names.split(","):
            name = raw.partition(":")[0].rstrip("*").strip()
            if name:
                found.append((operator, name))
    return found


def tenant_variable(template: str) -> str | None:
    """The template's first variable whose name looks tenant-identifying, or None."""
    return next((name for _, name in variables(template) if tenant_word(name) is not None), None)


def instantiate(template: str, variable: str, value: str) -> str:
    """A URI of the template: `variable` set to `value`, every other variable to a sample."""

    def expand(match: re.Match[str]) -> str:
        operator, names = match.groups()
        if variable in [raw.partition(":")[0].rstrip("*").strip() for raw in names.split(",")]:
            return {"": "", "+": ""}.get(operator, operator) + value
        return _SAMPLE_BY_OPERATOR.get(operator, "x")

    return EXPRESSION.sub(expand, template)


def template_covered(policy: Policy | None, template: str, variable: str) -> bool:
    """Whether the policy makes every URI of the template name the caller's tenant at `variable`."""
    if policy is None:
        return False
    scoped, named = uri_tenant(policy, instantiate(template, variable, PROBE_TENANT))
    return scoped and named == PROBE_TENANT


def policy_template(template: str, variable: str) -> str | None:
    """The upstream's template as `resources.tenant_uri_templates` names it ({tenant} at `variable`),
    or None when the policy's template syntax cannot say it."""

    def rewrite(match: re.Match[str]) -> str:
        operator, names = match.groups()
        first = names.split(",")[0].partition(":")[0].rstrip("*").strip()
        if first == variable:
            return {"": "", "+": ""}.get(operator, operator) + "{tenant}"
        return "{" + operator + first + "}"

    candidate = EXPRESSION.sub(rewrite, template)
    try:
        compile_uri_template(candidate)
    except ValueError:
        return None
    return candidate


# --- snippets ----------------------------------------------------------------------------------


def names_fix(view: TenantView, new_names: Iterable[str]) -> str:
    names = list(view.spec.tenant_arguments.names) if view.policy is not None else []
    names.extend(name for name in new_names if name not in names)
    return (
        "tenant_arguments:\n"
        f"  names: {flow(names)}\n"
        "  hide_from_schema: true   # clients no longer see them; the proxy fills in the caller's tenant\n"
    )


def template_fix(view: TenantView, template: str | None, todo: str) -> str:
    """`template` added to the policy's; when there is none to add, `todo` says what to write."""
    existing = list(view.spec.resources.tenant_uri_templates)
    if template is None:
        return f"resources:\n  tenant_uri_templates: {flow(existing)}   # add {todo}\n"
    return f"resources:\n  tenant_uri_templates: {flow([*existing, template])}\n"


def deny_fix(view: TenantView, tool: str) -> str:
    deny = [*view.spec.tools.deny, tool]
    return (
        f"tools:\n  deny: {flow(deny)}\n"
        "recent_activity:   # the proxy's own proxy_recent_activity tool shows the caller's tenant only\n"
        "  enabled: true\n"
    )


def cache_fix(view: TenantView, tool: str) -> str:
    kept = {name: ttl for name, ttl in view.spec.tools.cache_ttl_seconds.items() if name != tool}
    inner = ", ".join(f"{json.dumps(name)}: {ttl:g}" for name, ttl in kept.items())
    return f"tools:\n  cache_ttl_seconds: {{{inner}}}   # {tool} no longer cached\n"


def capabilities_fix(roots: bool, sampling: bool) -> str:
    lines = ["client_capabilities:"]
    if roots:
        lines.append('  roots: ["file:///srv/{tenant}"]   # or deny: each tenant sees only its own')
    if sampling:
        lines.append("  sampling: deny")
    return "\n".join(lines) + "\n"
