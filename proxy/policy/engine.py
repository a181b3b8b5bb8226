"""Pure policy decisions: `evaluate(policy, tenant, message, declared) -> Decision`, and result filters.

Nothing here does I/O or mutates its inputs, so every rule is tested from tables. A tenant
argument (any configured name, at any depth of the arguments) must be a string equal to the
caller's tenant; anything else is a spoof attempt, refused or (on_mismatch: rewrite) replaced.
A resource URI in a tenant-scoped scheme must match a template and name the caller's tenant.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote

from proxy.policy.model import Policy
from proxy.types import JsonObject

Path = tuple[str | int, ...]  # a location inside params: keys and list indices


class Action(enum.Enum):
    FORWARD = "forward"  # unchanged
    REWRITE = "rewrite"  # apply `rewrites` to params, then forward
    DENY = "deny"  # refuse: PolicyDenied naming the rule, no upstream call
    HIDE_RESOURCE = "hide_resource"  # refuse exactly as an unknown resource (no existence probing)
    ANSWER = "answer"  # answer locally with `answer` (no upstream call)


@dataclass(frozen=True, slots=True)
class Rewrite:
    path: Path
    value: Any


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    rule: str | None = None
    argument: str | None = None  # where the offending value was (names only, never the value)
    rewrites: tuple[Rewrite, ...] = ()
    spoof: bool = False
    answer: JsonObject | None = None
    uri: str | None = None

    @property
    def reason(self) -> str:
        if self.rule == "tenant_arguments":
            return f"argument {self.argument!r} must name the caller's tenant (rule tenant_arguments)"
        if self.rule in ("tools.allow", "tools.deny"):
            return f"tool {self.argument!r} is not allowed (rule {self.rule})"
        return f"rule {self.rule}"


UNCHANGED = Decision(Action.FORWARD)


def describe(path: Path) -> str:
    """An argument path as the client wrote it (`filters[0].tenant_id`), truncated for logs."""
    text = ""
    for part in path[1:] if path[:1] == ("arguments",) else path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text[:200]


def tenant_argument_mismatches(value: Any, names: frozenset[str], tenant: str, base: Path) -> list[Path]:
    """Every place under `value` where a configured tenant-argument name holds anything but `tenant`."""
    found: list[Path] = []
    stack: list[tuple[Path, Any]] = [(base, value)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            for key, child in node.items():
                if key in names:
                    if not (isinstance(child, str) and child == tenant):
                        found.append((*path, key))
                elif isinstance(child, dict | list):
                    stack.append(((*path, key), child))
        elif isinstance(node, list):
            stack.extend(
                ((*path, index), child) for index, child in enumerate(node) if isinstance(child, dict | list)
            )
    found.sort(key=lambda p: [str(part) for part in p])
    return found


def _absent(params: JsonObject, path: Path) -> bool:
    """Whether a declared argument is missing where it can be filled in (its parent object exists,
    or it is top-level and the whole `arguments` object is missing)."""
    node: Any = params
    for depth, part in enumerate(path[:-1]):
        if not isinstance(node, dict):
            return False
        if part not in node:
            return depth == 0
        node = node[part]
    return isinstance(node, dict) and path[-1] not in node


def _fills(params: JsonObject, declared: Iterable[Path], tenant: str) -> list[Rewrite]:
    return [Rewrite(path, tenant) for path in declared if _absent(params, path)]


def _check_arguments(
    policy: Policy, tenant: str, params: JsonObject, roots: Iterable[Path], declared: Iterable[Path]
) -> Decision:
    mismatches: list[Path] = []
    for root in roots:
        node: Any = params
        for part in root:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict | list):
            mismatches.extend(tenant_argument_mismatches(node, policy.tenant_argument_names, tenant, root))
    fills = _fills(params, declared, tenant)
    if mismatches and not policy.rewrite_mismatches:
        return Decision(Action.DENY, "tenant_arguments", describe(mismatches[0]), spoof=True)
    rewrites = tuple(Rewrite(path, tenant) for path in mismatches) + tuple(fills)
    if not rewrites:
        return UNCHANGED
    rule = "tenant_arguments" if mismatches else None
    argument = describe(mismatches[0]) if mismatches else None
    return Decision(Action.REWRITE, rule, argument, rewrites, spoof=bool(mismatches))


def _dot_segments(text: str) -> bool:
    decoded = text
    for _ in range(4):  # undo nested percent-encoding (%252e...) before looking for traversal
        step = unquote(decoded)
        if step == decoded:
            break
        decoded = step
    decoded = decoded.replace("\\", "/")
    return any(segment in (".", "..") for segment in decoded.split("/"))


def uri_tenant(policy: Policy, uri: str) -> tuple[bool, str | None]:
    """(scoped, tenant): whether `uri` is in a tenant-scoped scheme, and the tenant it names there.

    A scoped URI that matches no template, or holds whitespace, control characters, backslashes or
    dot segments (even percent-encoded), names no tenant (None): it can only be refused.
    """
    stripped = uri.strip()
    scheme = stripped.partition(":")[0].lower() if ":" in stripped else ""
    if scheme not in policy.scoped_schemes:
        return False, None
    if stripped != uri or any(ch <= " " or ch == "\x7f" for ch in uri):
        return True, None
    after_scheme = uri.partition(":")[2]
    if _dot_segments(after_scheme.partition("?")[0].partition("#")[0]):
        return True, None
    for template in policy.uri_templates:
        if template.scheme == scheme:
            named = template.tenant_of(uri)
            if named is not None:
                return True, named
    return True, None


def foreign_uri(policy: Policy, tenant: str, uri: Any) -> bool:
    """True when a resource URI must be refused for this tenant."""
    if not isinstance(uri, str):
        return False  # not a URI at all: the upstream rejects the shape itself
    scoped, named = uri_tenant(policy, uri)
    return scoped and named != tenant


def _template_variable(segment: str | None) -> str | None:
    if segment and segment.startswith("{") and segment.endswith("}"):
        name = segment[1:-1].lstrip("+#./;?&")
        return name or None
    return None


def _evaluate_completion(policy: Policy, tenant: str, params: JsonObject) -> Decision:
    names = set(policy.tenant_argument_names)
    ref = params.get("ref")
    if isinstance(ref, dict) and ref.get("type") == "ref/resource" and isinstance(ref.get("uri"), str):
        scoped, named = uri_tenant(policy, ref["uri"])
        variable = _template_variable(named)
        if variable is not None:
            names.add(variable)  # this template's tenant position is completed like a tenant argument
        elif scoped and named != tenant:
            return Decision(
                Action.HIDE_RESOURCE, "resources.tenant_uri_templates", spoof=True, uri=ref["uri"]
            )
    argument = params.get("argument")
    if isinstance(argument, dict) and argument.get("name") in names:
        partial = argument.get("value")
        values = [tenant] if isinstance(partial, str) and tenant.startswith(partial) else []
        return Decision(
            Action.ANSWER,
            answer={"completion": {"values": values, "total": len(values), "hasMore": False}},
        )
    return _check_arguments(
        _with_names(policy, names), tenant, params, [("context", "arguments")], declared=()
    )


def _with_names(policy: Policy, names: set[str]) -> Policy:
    if names == policy.tenant_argument_names:
        return policy
    return replace(policy, tenant_argument_names=frozenset(names))


def evaluate(
    policy: Policy, tenant: str, method: str | None, params: JsonObject, declared: Iterable[Path] = ()
) -> Decision:
    """The decision for one client request. `declared`: the tenant-argument paths the tool's (or
    prompt's) schema declares, which are filled in when absent."""
    if method == "tools/call":
        name = params.get("name")
        if isinstance(name, str):
            rule = policy.denying_rule(name)
            if rule is not None:
                return Decision(Action.DENY, rule, name[:200])
        return _check_arguments(policy, tenant, params, [("arguments",)], declared)
    if method == "prompts/get":
        return _check_arguments(policy, tenant, params, [("arguments",)], declared)
    if method == "completion/complete":
        return _evaluate_completion(policy, tenant, params)
    if method in ("resources/read", "resources/subscribe", "resources/unsubscribe"):
        uri = params.get("uri")
        if foreign_uri(policy, tenant, uri):
            return Decision(Action.HIDE_RESOURCE, "resources.tenant_uri_templates", spoof=True, uri=uri)
    return UNCHANGED


# --- schemas and results ---------------------------------------------------------------------


def declared_tenant_paths(input_schema: Any, names: frozenset[str]) -> tuple[Path, ...]:
    """Paths (under params) of tenant arguments an inputSchema declares through `properties` chains."""
    found: list[Path] = []
    stack: list[tuple[Path, Any]] = [(("arguments",), input_schema)]
    while stack:
        path, schema = stack.pop()
        properties = schema.get("properties") if isinstance(schema, dict) else None
        if not isinstance(properties, dict):
            continue
        for key, sub in properties.items():
            if key in names:
                found.append((*path, key))
            elif isinstance(sub, dict):
                stack.append(((*path, key), sub))
    return tuple(sorted(found, key=lambda p: [str(part) for part in p]))


def hide_tenant_properties(input_schema: Any, names: frozenset[str]) -> Any:
    """The schema without tenant-argument properties (nor their `required` entries), at any depth."""
    if not isinstance(input_schema, dict):
        return input_schema
    properties = input_schema.get("properties")
    if not isinstance(properties, dict):
        return input_schema
    schema = dict(input_schema)
    schema["properties"] = {
        key: hide_tenant_properties(sub, names) for key, sub in properties.items() if key not in names
    }
    required = schema.get("required")
    if isinstance(required, list):
        schema["required"] = [item for item in required if item not in names]
    return schema


def filter_result(policy: Policy, tenant: str, method: str | None, result: JsonObject) -> JsonObject:
    """What this tenant may see of a list or read result; other results pass unchanged."""
    if method == "tools/list" and isinstance(result.get("tools"), list):
        tools = []
        for tool in result["tools"]:
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                continue
            if not policy.tool_allowed(tool["name"]):
                continue
            if policy.hide_from_schema and "inputSchema" in tool:
                tool = {
                    **tool,
                    "inputSchema": hide_tenant_properties(tool["inputSchema"], policy.tenant_argument_names),
                }
            tools.append(tool)
        return {**result, "tools": tools}
    if method == "prompts/list" and policy.hide_from_schema and isinstance(result.get("prompts"), list):
        prompts = []
        for prompt in result["prompts"]:
            if isinstance(prompt, dict) and isinstance(prompt.get("arguments"), list):
                arguments = [
                    a for a in prompt["arguments"]
                    if not (isinstance(a, dict) and a.get("name") in policy.tenant_argument_names)
                ]  # fmt: skip
                prompt = {**prompt, "arguments": arguments}
            prompts.append(prompt)
        return {**result, "prompts": prompts}
    if not policy.uri_templates:
        return result
    if method == "resources/list" and isinstance(result.get("resources"), list):
        kept = [
            r
            for r in result["resources"]
            if not (isinstance(r, dict) and foreign_uri(policy, tenant, r.get("uri")))
        ]
        return {**result, "resources": kept}
    if method == "resources/templates/list" and isinstance(result.get("resourceTemplates"), list):
        kept = [t for t in result["resourceTemplates"] if not _foreign_template(policy, tenant, t)]
        return {**result, "resourceTemplates": kept}
    if method == "resources/read" and isinstance(result.get("contents"), list):
        kept = [
            c
            for c in result["contents"]
            if not (isinstance(c, dict) and foreign_uri(policy, tenant, c.get("uri")))
        ]
        return {**result, "contents": kept}
    return result


def _foreign_template(policy: Policy, tenant: str, template: Any) -> bool:
    if not isinstance(template, dict) or not isinstance(template.get("uriTemplate"), str):
        return False
    scoped, named = uri_tenant(policy, template["uriTemplate"])
    return scoped and _template_variable(named) is None and named != tenant
