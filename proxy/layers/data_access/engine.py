"""Pure policy decisions: `evaluate(policy, tenant, message, declared) -> Decision`, and result filters.

Nothing here does I/O or mutates its inputs, so every rule is tested from tables. A tenant
argument (any configured name, at any depth of the arguments) must be a string equal to the
caller's tenant; anything else is a spoof attempt, refused or (on_mismatch: rewrite) replaced.
A resource URI in a tenant-scoped scheme must match a template and name the caller's tenant.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote

from proxy.layers.data_access.policy import TENANT_VARIABLE, Policy
from proxy.layers.data_access.schemas import SchemaIndex, hide_tenant_properties
from proxy.protocol.errors import ParseError
from proxy.protocol.structure import check_structure
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
    detail: str | None = None  # what was wrong, when it is not a value naming another tenant

    @property
    def reason(self) -> str:
        if self.rule == "tenant_arguments":
            if self.detail:
                return f"argument {self.argument!r} {self.detail} (rule tenant_arguments)"
            return f"argument {self.argument!r} must name the caller's tenant (rule tenant_arguments)"
        if self.rule in ("tools.allow", "tools.deny"):
            return f"tool {self.argument!r} is not allowed (rule {self.rule})"
        return f"rule {self.rule}"


UNCHANGED = Decision(Action.FORWARD)


def apply_rewrites(params: JsonObject, rewrites: tuple[Rewrite, ...]) -> None:
    """Give `params` a decision's rewrites, in place; an absent (or null) object on a rewrite's path
    is created, as when a tenant argument is filled into arguments the client left out."""
    for rewrite in rewrites:
        node: Any = params
        for part in rewrite.path[:-1]:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            node = node[part]
        node[rewrite.path[-1]] = rewrite.value


JSON_STRING: Final = "<json>"  # a path part: what follows is inside a JSON document held in a string
MAX_JSON_NESTING: Final = 3  # JSON in a string in JSON in a string ...: refused beyond this
MAX_ARGUMENT_DEPTH: Final = 128
MAX_DOCUMENT_MEMBERS: Final = 20_000  # members and elements of the JSON documents in one request's strings


def describe(path: Path) -> str:
    """An argument path as the client wrote it (`filters[0].tenant_id`, `query<json>.tenant_id` for
    a member of a JSON document sent as a string), truncated for logs."""
    text = ""
    for part in path[1:] if path[:1] == ("arguments",) else path:
        if part == JSON_STRING:
            text += JSON_STRING
        elif isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text[:200]


class _Duplicate:
    """Stands for a tenant argument a JSON document names twice: parsers disagree on which counts."""


_DUPLICATE: Final = _Duplicate()


class _Undecidable(Exception):
    """A string some upstream parser may decode, which the proxy cannot look into (nested past the
    interpreter's own parsing depth, or past the request's budget of members): it is refused,
    never passed on unchecked."""


class _DocumentBudget:
    """Members and elements of the JSON documents held in one request's strings, all together.

    listen.max_json_members bounds the body, but the strings in it may hold documents of their own,
    each within MAX_DOCUMENT_MEMBERS: 4 MB of strings holding `[[],[],...]` made 1.4 million nodes
    to decode and walk, seconds of the event loop for one request. The total is bounded instead."""

    __slots__ = ("left",)

    def __init__(self, members: int = MAX_DOCUMENT_MEMBERS) -> None:
        self.left = members  # -1 once a document was refused: the request is, whatever else it holds


def _decode_document(text: str, names: frozenset[str], budget: _DocumentBudget) -> tuple[Any, bool]:
    """A string as an upstream would JSON-decode it, and whether the proxy can send it on rewritten.

    Python's and JavaScript's parsers keep the last of duplicate keys: a duplicated tenant argument
    becomes a value no tenant can match. A document Python refuses only for its number limits
    (JavaScript reads it) is looked into with those numbers stood in for, and cannot be rewritten.
    A JSON string literal (a document JSON-encoded once more) decodes to the string it holds, which
    the caller looks into again. (None, True) when the string is not a JSON object, array or string.
    """
    stripped = text.strip()
    if not stripped or stripped[0] not in '{["':
        return None, True
    if stripped[0] == '"':
        if budget.left < 0:
            raise _Undecidable()
        try:  # a string literal has no structure to bound: decoding it is linear in its length
            literal = json.loads(stripped)
        except ValueError:
            return None, True
        return (literal if isinstance(literal, str) else None), True

    def pairs(items: list[tuple[str, Any]]) -> JsonObject:
        result: JsonObject = {}
        for key, value in items:
            result[key] = _DUPLICATE if key in result and key in names else value
        return result

    if budget.left < 0:  # the request is refused already: no more work on it
        raise _Undecidable()
    try:  # bounded before it is parsed, as a request body is: refused, never passed on unchecked
        encoded = stripped.encode("utf-8", "surrogatepass")
        budget.left -= check_structure(encoded, min(budget.left, MAX_DOCUMENT_MEMBERS), MAX_ARGUMENT_DEPTH)
    except ParseError:
        budget.left = -1
        raise _Undecidable() from None
    rewritable = True
    try:
        decoded = json.loads(stripped, object_pairs_hook=pairs)
    except RecursionError:
        raise _Undecidable() from None
    except ValueError:
        try:  # numbers past Python's digit limit: JavaScript still parses the rest
            decoded = json.loads(stripped, object_pairs_hook=pairs, parse_int=float, parse_float=float)
        except RecursionError:
            raise _Undecidable() from None
        except ValueError:
            return None, True  # not JSON for any parser: a string like any other
        rewritable = False
    return (decoded if isinstance(decoded, dict | list) else None), rewritable


def _serialise_document(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class _ArgumentWalk:
    """One walk over arguments as the upstream will read them.

    Tenant arguments (configured names) at any depth must be the caller's tenant. A string is
    looked into as JSON when the schema says the value is not a string (SDKs decode such strings)
    or, unless the tool is exempt, when it holds a JSON object or array (defence in depth). Tenant
    arguments the schema declares and the client left out are filled in where their object exists.
    Outside JSON documents changes are recorded as rewrites of params; inside one they are applied
    to the decoded document, which is then sent on re-serialised, still as a string.
    """

    def __init__(
        self,
        tenant: str,
        names: frozenset[str],
        index: SchemaIndex | None,
        rewrite: bool,
        sniff: bool,
        budget: _DocumentBudget | None = None,
    ) -> None:
        self.tenant = tenant
        self.budget = _DocumentBudget() if budget is None else budget  # shared by the inner walks
        self.names = names
        self.index = index
        self.rewrite = rewrite
        self.sniff = sniff
        self.mismatches: list[Path] = []
        self.rewrites: list[Rewrite] = []
        self.too_deep: Path | None = None
        self.unrewritable: Path | None = None  # a document that had to change but cannot be re-sent

    def own(self, value: Any) -> bool:
        return isinstance(value, str) and value == self.tenant

    def walk(self, node: Any, path: Path, schemas: list[Any], level: int, inside: bool) -> bool:
        """Check `node` at `path`; `inside`: the node belongs to a decoded JSON document (changes
        are made to it in place) rather than to the request (changes are recorded as rewrites).
        Returns whether a document node was changed."""
        if len(path) > MAX_ARGUMENT_DEPTH:
            self.too_deep = self.too_deep or path
            return False
        index = self.index
        changed = False
        if isinstance(node, dict):
            for key in list(node):
                child = node[key]
                if key in self.names:
                    if not self.own(child):
                        self.mismatches.append((*path, key))
                        changed |= self._set(node, key, path, inside)
                    continue
                if isinstance(child, dict | list | str):
                    subschemas = index.property(schemas, key) if index and schemas else []
                    changed |= self._child(node, key, child, (*path, key), subschemas, level, inside)
            if index is not None and schemas:
                for name in index.declared(schemas, self.names):
                    if name not in node:
                        changed |= self._set(node, name, path, inside)
        elif isinstance(node, list):
            for position, child in enumerate(node):
                if isinstance(child, dict | list | str):
                    subschemas = index.item(schemas, position) if index and schemas else []
                    changed |= self._child(
                        node, position, child, (*path, position), subschemas, level, inside
                    )
        elif isinstance(node, str):
            replacement = self._string(node, path, schemas, level)
            if replacement is not None:
                self.rewrites.append(Rewrite(path, replacement))
        return changed

    def _child(
        self,
        parent: Any,
        key: str | int,
        child: Any,
        path: Path,
        schemas: list[Any],
        level: int,
        inside: bool,
    ) -> bool:
        if not isinstance(child, str):
            return self.walk(child, path, schemas, level, inside)
        replacement = self._string(child, path, schemas, level)
        if replacement is None:
            return False
        if inside:
            parent[key] = replacement
            return True
        self.rewrites.append(Rewrite(path, replacement))
        return False

    def _string(self, text: str, path: Path, schemas: list[Any], level: int) -> str | None:
        """A string looked into as the JSON document it may hold; the document re-serialised when
        something in it had to change, else None."""
        decoded_by_schema = bool(schemas) and self.index is not None and not self.index.takes_string(schemas)
        if not (decoded_by_schema or self.sniff):
            return None
        try:
            document, rewritable = _decode_document(text, self.names, self.budget)
        except _Undecidable:
            self.too_deep = self.too_deep or path
            return None
        if document is None:
            return None
        if level >= MAX_JSON_NESTING:
            self.too_deep = self.too_deep or path
            return None
        if isinstance(document, str):
            # Encoded once more (`"{\"tenant_id\": ...}"`): upstreams that decode until they hold no
            # string read the document inside. Rewritten, it is encoded back as many times.
            inner_text = self._string(document, (*path, JSON_STRING), schemas, level + 1)
            return None if inner_text is None else _serialise_document(inner_text)
        # A document the schema did not ask for is only looked into: nothing is filled in it.
        inner = _ArgumentWalk(self.tenant, self.names, self.index if decoded_by_schema else None,
                              self.rewrite, self.sniff, self.budget)  # fmt: skip
        inner_schemas = schemas if decoded_by_schema else []
        changed = inner.walk(document, (*path, JSON_STRING), inner_schemas, level + 1, inside=True)
        self.mismatches.extend(inner.mismatches)
        self.too_deep = self.too_deep or inner.too_deep
        self.unrewritable = self.unrewritable or inner.unrewritable
        if changed and not rewritable:
            self.unrewritable = self.unrewritable or path
            return None
        return _serialise_document(document) if changed else None

    def _set(self, node: JsonObject, key: str, path: Path, inside: bool) -> bool:
        """Give `node[key]` the caller's tenant (a mismatch in rewrite mode, or a fill)."""
        if inside:
            node[key] = self.tenant
            return True
        self.rewrites.append(Rewrite((*path, key), self.tenant))
        return False


def _check_arguments(
    policy: Policy,
    tenant: str,
    params: JsonObject,
    root: Path,
    schema: SchemaIndex | None,
    names: frozenset[str] | None = None,
    sniff: bool = True,
) -> Decision:
    """The decision for the arguments at `root` (e.g. ("arguments",)) of a request."""
    names = policy.tenant_argument_names if names is None else names
    walk = _ArgumentWalk(tenant, names, schema, policy.rewrite_mismatches, sniff)
    node: Any = params
    for part in root:
        node = node.get(part) if isinstance(node, dict) else None
    schemas = [schema.root] if schema is not None else []
    if node is None and len(root) == 1 and schema is not None:
        fills = schema.declared(schemas, names)  # no arguments at all: the declared ones are filled
        walk.rewrites.extend(Rewrite((*root, name), tenant) for name in fills)
    elif isinstance(node, dict | list | str):
        walk.walk(node, root, schemas, 0, inside=False)
    if walk.too_deep is not None:
        return Decision(
            Action.DENY, "tenant_arguments", describe(walk.too_deep),
            detail="is nested too deeply, or holds too much JSON inside strings, to be checked",
        )  # fmt: skip
    mismatches = sorted(walk.mismatches, key=lambda p: [str(part) for part in p])
    if mismatches and walk.unrewritable is not None:
        return Decision(
            Action.DENY, "tenant_arguments", describe(mismatches[0]), spoof=True,
            detail="must name the caller's tenant (a JSON document the proxy cannot rewrite)",
        )  # fmt: skip
    if mismatches and not policy.rewrite_mismatches:
        return Decision(Action.DENY, "tenant_arguments", describe(mismatches[0]), spoof=True)
    if not walk.rewrites:
        return UNCHANGED
    rule = "tenant_arguments" if mismatches else None
    argument = describe(mismatches[0]) if mismatches else None
    return Decision(Action.REWRITE, rule, argument, tuple(walk.rewrites), spoof=bool(mismatches))


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
    """(scoped, tenant): whether `uri` belongs to tenants (a tenant-scoped scheme, and not one of
    `resources.public_uris`), and the tenant it names there.

    A scoped URI that matches no template, or holds whitespace, control characters, backslashes or
    dot segments (even percent-encoded), names no tenant (None): it can only be refused. Those rules
    come first: a URI breaking them is never public, whatever the globs say.
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
    if policy.public_uris.shares(uri):
        return False, None
    return True, None


def public_uri(policy: Policy, uri: Any) -> bool:
    """Whether `uri` is in a tenant-scoped scheme and passes as one of `resources.public_uris`."""
    if not isinstance(uri, str) or not policy.uri_templates:
        return False
    scheme = uri.partition(":")[0].lower() if ":" in uri else ""
    return scheme in policy.scoped_schemes and uri_tenant(policy, uri) == (False, None)


def foreign_uri(policy: Policy, tenant: str, uri: Any) -> bool:
    """True when a resource URI must be refused for this tenant."""
    if not isinstance(uri, str):
        return False  # not a URI at all: the upstream rejects the shape itself
    scoped, named = uri_tenant(policy, uri)
    return scoped and named != tenant


def hides(policy: Policy, tenant: str, text: str) -> bool:
    """Whether a text (an upstream's error message, the URI in its data) is, or mentions, a URI the
    tenant may not see: such text never reaches the client."""
    return foreign_uri(policy, tenant, text) or mentions_foreign_uri(policy, tenant, text)


def mentions_foreign_uri(policy: Policy, tenant: str, value: Any, budget: int = 2_000) -> bool:
    """Whether any string in `value` (a notification's params) is, or mentions, a URI of a
    tenant-scoped scheme that names anyone but `tenant`. Bounded: past `budget` strings the answer
    is True (such a message is dropped rather than read to its end)."""
    pattern = policy.scoped_uri_mentions
    if pattern is None:
        return False
    stack: list[Any] = [value]
    seen = 0
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str) and ":" in node:
            seen += 1
            if seen > budget:
                return True
            if any(foreign_uri(policy, tenant, found.group()) for found in pattern.finditer(node)):
                return True
    return False


def _template_variable(segment: str | None) -> str | None:
    if segment and segment.startswith("{") and segment.endswith("}"):
        name = segment[1:-1].lstrip("+#./;?&")
        return name or None
    return None


def completion_names(policy: Policy) -> frozenset[str]:
    """What identifies a tenant among completion arguments, whatever the reference: the policy's
    tenant arguments and the tenant variable of its URI templates."""
    if policy.uri_templates:
        return policy.tenant_argument_names | {TENANT_VARIABLE}
    return policy.tenant_argument_names


def _evaluate_completion(policy: Policy, tenant: str, params: JsonObject) -> Decision:
    names = set(completion_names(policy))
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
    frozen = frozenset(names)
    argument = params.get("argument")
    if isinstance(argument, dict) and argument.get("name") in frozen:
        partial = argument.get("value")
        values = [tenant] if isinstance(partial, str) and tenant.startswith(partial) else []
        return Decision(
            Action.ANSWER,
            answer={"completion": {"values": values, "total": len(values), "hasMore": False}},
        )
    # The completion handler reads the context whatever `ref` says; a value may hold a JSON document.
    decision = _check_arguments(policy, tenant, params, ("context", "arguments"), None, frozen)
    if decision.action is not Action.FORWARD:
        return decision
    return _check_arguments(policy, tenant, params, ("argument", "value"), None, frozen)


def evaluate(
    policy: Policy, tenant: str, method: str | None, params: JsonObject, schema: Any = None
) -> Decision:
    """The decision for one client request. `schema`: the input schema the tool (or prompt)
    declares, as a dict or a SchemaIndex: it says where the upstream decodes JSON from strings and
    which tenant arguments are filled in when absent. Whatever the method, the request's `_meta`
    and the `inputResponses` of a multi-round-trip retry are client data an upstream may read too."""
    decision = _evaluate_method(policy, tenant, method, params, schema)
    if decision.action not in (Action.FORWARD, Action.REWRITE):
        return decision
    for extra in ("_meta", "inputResponses"):
        if extra in params:
            decision = _combine(decision, _check_arguments(policy, tenant, params, (extra,), None))
            if decision.action is Action.DENY:
                return decision
    return decision


def evaluate_answer(policy: Policy, tenant: str, answer: JsonObject) -> Decision:
    """The decision for a client's answer to a server-to-client request (an elicitation form, a
    sampled message): the upstream acts on it as on arguments. Paths are under the answer itself."""
    return _check_arguments(policy, tenant, answer, ("result",), None)


def _combine(first: Decision, second: Decision) -> Decision:
    """Two decisions on one request: a denial wins; rewrites add up."""
    if second.action is Action.FORWARD:
        return first
    if second.action is not Action.REWRITE or first.action is Action.FORWARD:
        return second
    return Decision(
        Action.REWRITE,
        first.rule or second.rule,
        first.argument or second.argument,
        first.rewrites + second.rewrites,
        spoof=first.spoof or second.spoof,
    )


def _evaluate_method(
    policy: Policy, tenant: str, method: str | None, params: JsonObject, schema: Any
) -> Decision:
    index = schema if isinstance(schema, SchemaIndex) or schema is None else SchemaIndex(schema)
    if method == "tools/call":
        name = params.get("name")
        if isinstance(name, str):
            rule = policy.denying_rule(name)
            if rule is not None:
                return Decision(Action.DENY, rule, name[:200])
        sniff = not (isinstance(name, str) and policy.json_documents_in(name))
        return _check_arguments(policy, tenant, params, ("arguments",), index, sniff=sniff)
    if method == "prompts/get":
        return _check_arguments(policy, tenant, params, ("arguments",), index)
    if method == "completion/complete":
        return _evaluate_completion(policy, tenant, params)
    if method in ("resources/read", "resources/subscribe", "resources/unsubscribe"):
        uri = params.get("uri")
        if foreign_uri(policy, tenant, uri):
            return Decision(Action.HIDE_RESOURCE, "resources.tenant_uri_templates", spoof=True, uri=uri)
        if public_uri(policy, uri):  # forwarded as any other; the rule is named for `policy explain`
            return Decision(Action.FORWARD, "resources.public_uris", uri=uri)
    return UNCHANGED


# --- schemas and results ---------------------------------------------------------------------


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
