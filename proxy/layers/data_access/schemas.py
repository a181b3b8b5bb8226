"""Tool and prompt input schemas as an upstream's SDK reads them.

SDKs write nested models with `$ref` into `$defs` (Pydantic, zod-to-json-schema), optional ones as
`anyOf: [{$ref}, {type: null}]`, and merged ones with `allOf`. `SchemaIndex` answers, for a place
in the arguments, which subschemas apply there, whether a string is a value the upstream takes as
it is (or would JSON-decode first), and which tenant arguments it declares. Only local references
(`#/...`) are followed, a bounded number of hops: an upstream cannot make the proxy fetch anything.

`hide_tenant_properties` drops tenant arguments from every subschema, `$defs` included.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final
from urllib.parse import unquote

from proxy.types import JsonObject

MAX_REF_HOPS: Final = 32
MAX_EXPANSION: Final = 64  # subschemas one place may combine (allOf, $ref, anyOf branches)

# Keywords whose value is one subschema, a list of them, or a name -> subschema map.
_ONE = ("additionalProperties", "items", "contains", "not", "if", "then", "else", "propertyNames",
        "unevaluatedProperties", "unevaluatedItems", "additionalItems")  # fmt: skip
_MANY = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_OBJECT_MARKERS = ("properties", "patternProperties", "additionalProperties", "required")
_ARRAY_MARKERS = ("items", "prefixItems", "contains")


def _pointer(root: Any, ref: str) -> Any:
    """The subschema a local JSON pointer (`#/$defs/Query`) names, or None."""
    if not ref.startswith("#"):
        return None
    node = root
    for raw in unquote(ref[1:]).split("/")[1:] if ref != "#" else []:
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


class SchemaIndex:
    """One input schema, with its local references resolvable. Expansions are memoised: the index
    lives as long as the catalog entry, so each subschema is expanded once, not on every request."""

    def __init__(self, root: Any) -> None:
        self.root: JsonObject = root if isinstance(root, dict) else {}
        self._expanded: dict[int, tuple[tuple[JsonObject, ...], tuple[tuple[JsonObject, ...], ...]]] = {}

    def expand(self, schema: Any) -> tuple[tuple[JsonObject, ...], tuple[tuple[JsonObject, ...], ...]]:
        """(parts, alternatives): the subschemas that all apply here (the schema, its `$ref` target,
        its `allOf` members, recursively) and the `anyOf`/`oneOf` groups among them."""
        if not isinstance(schema, dict):
            return (), ()
        known = self._expanded.get(id(schema))
        if known is not None:
            return known
        parts: list[JsonObject] = []
        groups: list[tuple[JsonObject, ...]] = []
        seen: set[int] = set()
        pending: list[Any] = [schema]
        while pending and len(parts) < MAX_EXPANSION:
            node = pending.pop()
            hops = 0
            while isinstance(node, dict) and id(node) not in seen:
                seen.add(id(node))
                parts.append(node)
                members = node.get("allOf")
                if isinstance(members, list):
                    pending.extend(members)
                for keyword in ("anyOf", "oneOf"):
                    branches = node.get(keyword)
                    if isinstance(branches, list):
                        groups.append(tuple(b for b in branches if isinstance(b, dict)))
                ref = node.get("$ref")
                if not isinstance(ref, str) or hops >= MAX_REF_HOPS:
                    break
                hops += 1
                node = _pointer(self.root, ref)
        result = (tuple(parts), tuple(groups))
        self._expanded[id(schema)] = result
        return result

    def applicable(self, schemas: Iterable[Any]) -> list[JsonObject]:
        """Every subschema that may apply where `schemas` apply: all parts, and every branch of their
        alternatives (any of them may be the one the value matches)."""
        out: list[JsonObject] = []
        included: set[int] = set()
        expanded: set[int] = set()
        stack = [s for s in schemas if isinstance(s, dict)]
        while stack and len(out) < MAX_EXPANSION:
            schema = stack.pop()
            if id(schema) in expanded:
                continue
            expanded.add(id(schema))
            parts, groups = self.expand(schema)
            for part in parts:
                if id(part) not in included:
                    included.add(id(part))
                    out.append(part)
            for group in groups:
                stack.extend(group)
        return out

    def property(self, schemas: Iterable[Any], key: str) -> list[Any]:
        """The subschemas that apply to member `key` of an object where `schemas` apply."""
        found: list[Any] = []
        for schema in self.applicable(schemas):
            properties = schema.get("properties")
            if isinstance(properties, dict) and key in properties:
                found.append(properties[key])
                continue
            patterns = schema.get("patternProperties")
            if isinstance(patterns, dict) and patterns:
                found.extend(patterns.values())  # which pattern matches is the upstream's business
            extra = schema.get("additionalProperties")
            if isinstance(extra, dict):
                found.append(extra)
        return found

    def item(self, schemas: Iterable[Any], index: int) -> list[Any]:
        """The subschemas that apply to element `index` of an array where `schemas` apply."""
        found: list[Any] = []
        for schema in self.applicable(schemas):
            prefix = schema.get("prefixItems")
            items = schema.get("items")
            if isinstance(prefix, list) and index < len(prefix):
                found.append(prefix[index])
            elif isinstance(items, list):  # draft 4-7 tuple form
                found.append(items[index] if index < len(items) else schema.get("additionalItems"))
            elif isinstance(items, dict):
                found.append(items)
        return [f for f in found if isinstance(f, dict)]

    def takes_string(self, schemas: list[Any]) -> bool:
        """Whether a string is, for these schemas, a value in itself; False when every applicable
        schema wants something else (an object, array, number, ...), which is when SDKs JSON-decode
        a string first (the Python SDK does so for every parameter not typed `str`)."""
        applicable = self.applicable(schemas)
        if not applicable:
            return True  # nothing is known: a string may be just that
        for schema in applicable:
            kind = schema.get("type")
            if kind == "string" or (isinstance(kind, list) and "string" in kind):
                return True
            if kind is None and not any(marker in schema for marker in (*_OBJECT_MARKERS, *_ARRAY_MARKERS)):
                if "$ref" in schema or "allOf" in schema or "anyOf" in schema or "oneOf" in schema:
                    continue  # a combinator: its members were judged on their own
                if "const" in schema or "enum" in schema:
                    enum = schema.get("enum")
                    values: list[Any] = enum if isinstance(enum, list) else [schema.get("const")]
                    if any(isinstance(value, str) for value in values):
                        return True
                    continue
                return True  # untyped: anything goes, a string included
        return False

    def declared(self, schemas: list[Any], names: frozenset[str]) -> list[str]:
        """Tenant arguments an object where `schemas` apply declares, in name order: those every
        part declares between them, and those every object branch of an anyOf/oneOf declares."""
        declared: set[str] = set()
        for schema in schemas:
            parts, groups = self.expand(schema)
            for part in parts:
                properties = part.get("properties")
                if isinstance(properties, dict):
                    declared.update(name for name in names if name in properties)
            for group in groups:
                objects = [b for b in group if _may_be_object(self, b)]
                if objects:
                    common = set(names)
                    for branch in objects:
                        common &= set(self.declared([branch], names))
                    declared |= common
        return sorted(declared)


def _may_be_object(index: SchemaIndex, schema: JsonObject) -> bool:
    for part in index.expand(schema)[0]:
        kind = part.get("type")
        if kind == "object" or (isinstance(kind, list) and "object" in kind):
            return True
        if any(marker in part for marker in _OBJECT_MARKERS):
            return True
    return False


def hide_tenant_properties(schema: Any, names: frozenset[str]) -> Any:
    """The schema without tenant-argument properties (nor their `required` entries), in every
    subschema: nested properties, `$defs`, composition branches, items. The input is not changed."""
    if isinstance(schema, list):
        return [hide_tenant_properties(item, names) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: JsonObject = {}
    for key, value in schema.items():
        if key in _MAPS and isinstance(value, dict):
            kept = (
                value.items() if key != "properties" else ((k, v) for k, v in value.items() if k not in names)
            )
            out[key] = {k: hide_tenant_properties(v, names) for k, v in kept}
        elif (key in _ONE or key in _MANY) and isinstance(value, dict | list):
            out[key] = hide_tenant_properties(value, names)
        elif key == "required" and isinstance(value, list):  # the proxy fills tenant arguments in
            out[key] = [item for item in value if item not in names]
        else:
            out[key] = value  # const, enum, default, examples, descriptions: data, not schemas
    return out
