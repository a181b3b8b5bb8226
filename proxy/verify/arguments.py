"""Arguments as a tool's input schema declares them, at any depth, and sample values for the probes.

Schemas are read as the proxy reads them (SchemaIndex: `$ref`/`$defs`, `allOf`, `anyOf`/`oneOf`,
`items`, `additionalProperties`), so an argument nested in a referenced model is found where the
upstream's SDK would look for it. Each distinct subschema is walked once: a recursive model ends.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from proxy.layers.data_access.schemas import SchemaIndex
from proxy.types import JsonObject
from proxy.verify.words import mentions_json, tenant_description, tenant_word

MAX_DEPTH: Final = 12
_ANY_KEY: Final = "\x00any"  # a key no schema declares: what property() gives is the catch-alls
_COMBINATORS: Final = ("$ref", "allOf", "anyOf", "oneOf")
_CONSTRAINTS: Final = frozenset(
    {"type", "enum", "const", "properties", "patternProperties", "additionalProperties", "items",
     "prefixItems", "required", "not", "format", "pattern", "minimum", "maximum"}
)  # fmt: skip


@dataclass(frozen=True)
class Argument:
    path: str  # as a client writes it: query.tenant_id, filters[].org, labels.*
    name: str  # the last key ("" for array items and catch-alls)
    description: str | None
    refs: tuple[str, ...]  # the $refs followed to reach it
    free_form: str | None  # what makes its value a document of any shape, or None
    container: bool = False  # an object or array: it holds arguments, it names no one itself

    def tenant_hint(self) -> tuple[str, bool] | None:
        """(why, by name): why the argument looks tenant-identifying, or None."""
        if self.container:
            return None
        word = tenant_word(self.name) if self.name else None
        if word is not None:
            return f"its name has {word!r}", True
        phrase = tenant_description(self.description)
        return (f"its description says {phrase!r}", False) if phrase else None


def _combinator(part: JsonObject) -> bool:
    return any(key in part for key in _COMBINATORS)


def _free_form(parts: list[JsonObject]) -> str | None:
    for part in parts:
        if _combinator(part) or part.get("type") == "null":
            continue
        kind = part.get("type")
        if not _CONSTRAINTS & part.keys():
            return "takes any JSON value"
        is_object = kind == "object" or (kind is None and "additionalProperties" in part)
        extra = part.get("additionalProperties", True)
        if (
            is_object
            and not part.get("properties")
            and not part.get("patternProperties")
            and extra is not False
        ):
            return "is an object with keys of any name"
        if kind == "string" and (
            part.get("contentMediaType") == "application/json"
            or part.get("format") == "json"
            or mentions_json(part.get("description"))
        ):
            return "is a string holding a JSON document"
    return None


def _container(parts: list[JsonObject]) -> bool:
    for part in parts:
        kind = part.get("type")
        if kind in ("object", "array") or "properties" in part or "items" in part:
            return True
    return False


def _description(parts: Iterable[JsonObject]) -> str | None:
    """The first description (titles are left out: SDKs make them from the name)."""
    for part in parts:
        text = part.get("description")
        if isinstance(text, str) and text.strip():
            return text.strip()
    return None


def _with_refs(refs: tuple[str, ...], parts: list[JsonObject]) -> tuple[str, ...]:
    """The $refs followed so far, and those among `parts`."""
    found = [p["$ref"] for p in parts if isinstance(p.get("$ref"), str)]
    return refs + tuple(dict.fromkeys(ref for ref in found if ref not in refs))


def declared_arguments(schema: Any) -> list[Argument]:
    """Every argument the schema declares, at any depth, in the order a reader expects."""
    index = SchemaIndex(schema)
    found: list[Argument] = []
    seen: set[frozenset[int]] = set()
    pending: list[tuple[str, list[Any], tuple[str, ...], int]] = [("", [index.root], (), 0)]
    while pending:
        path, schemas, refs, depth = pending.pop(0)
        parts = index.applicable(schemas)
        key = frozenset(id(part) for part in parts)
        if key in seen or depth > MAX_DEPTH:
            continue
        seen.add(key)
        refs = _with_refs(refs, parts)
        children: list[tuple[str, str, list[Any]]] = []
        names: list[str] = []
        for part in parts:
            properties = part.get("properties")
            if isinstance(properties, dict):
                names.extend(name for name in properties if name not in names)
        children.extend(
            (f"{path}.{name}" if path else name, name, index.property(schemas, name)) for name in names
        )
        catch_all = [s for s in index.property(schemas, _ANY_KEY) if isinstance(s, dict) and s]
        if catch_all:
            children.append((f"{path}.*" if path else "*", "", catch_all))
        items = index.item(schemas, 0)
        if items:
            children.append((f"{path}[]", "", items))
        for child_path, name, child_schemas in children:
            child_parts = index.applicable(child_schemas)
            description, loose, container = (
                _description(child_parts),
                _free_form(child_parts),
                _container(child_parts),
            )
            found.append(
                Argument(child_path, name, description, _with_refs(refs, child_parts), loose, container)
            )
            pending.append((child_path, child_schemas, refs, depth + 1))
    return found


# --- sample values ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Filler:
    """How the probes fill arguments: tenant-like ones with `tenant`, other strings with `text`."""

    tenant: str
    text: str
    tenant_names: frozenset[str] = frozenset()  # the policy's tenant arguments, when visible
    optional: bool = False  # fill optional properties too (when writing canaries)

    def names_tenant(self, name: str, description: str | None) -> bool:
        return (
            name in self.tenant_names
            or tenant_word(name) is not None
            or bool(tenant_description(description))
        )


def _chosen(index: SchemaIndex, schemas: Iterable[Any]) -> list[JsonObject]:
    """The parts a sample value must satisfy: all parts, and of each anyOf/oneOf the first branch
    that is not null."""
    out: list[JsonObject] = []
    pending = [s for s in schemas if isinstance(s, dict)]
    while pending and len(out) < 64:
        parts, groups = index.expand(pending.pop(0))
        out.extend(parts)
        for group in groups:
            branch = next((b for b in group if b.get("type") != "null"), None)
            if branch is not None:
                pending.append(branch)
    return out


def sample_arguments(schema: Any, filler: Filler) -> JsonObject:
    index = SchemaIndex(schema)
    value = _sample(index, [index.root], filler, "", 0)
    return value if isinstance(value, dict) else {}


def _sample(index: SchemaIndex, schemas: list[Any], filler: Filler, name: str, depth: int) -> Any:
    parts = _chosen(index, schemas)
    description = _description(parts)
    for part in parts:
        if "const" in part:
            return part["const"]
        if isinstance(part.get("enum"), list) and part["enum"]:
            return part["enum"][0]
    kinds = [part.get("type") for part in parts if part.get("type") not in (None, "null")]
    kind = kinds[0] if kinds else None
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind is None and any("properties" in part for part in parts):
        kind = "object"
    if kind == "object" or (kind is None and not name):
        return _sample_object(index, schemas, parts, filler, depth) if depth < MAX_DEPTH else {}
    if kind == "array":
        return []
    if kind in ("integer", "number"):
        low = next((p["minimum"] for p in parts if isinstance(p.get("minimum"), int | float)), 0)
        return int(low) if kind == "integer" else float(low)
    if kind == "boolean":
        return False
    if kind == "string" or kind is None:
        if filler.names_tenant(name, description):
            return filler.tenant
        return _sample_string(parts, filler.text)
    return None


def _sample_object(
    index: SchemaIndex, schemas: list[Any], parts: list[JsonObject], filler: Filler, depth: int
) -> JsonObject:
    required: set[str] = set()
    names: list[str] = []
    for part in parts:
        if isinstance(part.get("required"), list):
            required.update(str(n) for n in part["required"])
        if isinstance(part.get("properties"), dict):
            names.extend(n for n in part["properties"] if n not in names)
    out: JsonObject = {}
    for name in names:
        child = index.property(schemas, name)
        child_parts = _chosen(index, child)
        stringy = any(p.get("type") == "string" for p in child_parts)
        wanted = name in required or (stringy and filler.names_tenant(name, _description(child_parts)))
        if wanted or (filler.optional and stringy):
            out[name] = _sample(index, child, filler, name, depth + 1)
    return out


def _sample_string(parts: list[JsonObject], text: str) -> str:
    formats = {part.get("format") for part in parts}
    if "date-time" in formats:
        return "2024-01-01T00:00:00Z"
    if "date" in formats:
        return "2024-01-01"
    if "email" in formats:
        return f"{text or 'probe'}@example.invalid"
    if formats & {"uri", "url"}:
        return f"https://example.invalid/{text}"
    shortest = max((p["minLength"] for p in parts if isinstance(p.get("minLength"), int)), default=0)
    return text + "x" * max(0, shortest - len(text))
