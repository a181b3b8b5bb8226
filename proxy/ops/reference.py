"""docs/configuration.md: the configuration reference, written from the JSON Schemas the loader's
own models generate (`python -m proxy schema --markdown`), so the document cannot drift from what
`check-config` accepts: every key with its type, default and description.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from proxy.ops.schema import generate

Schema = dict[str, Any]

_INTRO = """\
# Configuration reference

Generated from the config and policy models by `python -m proxy schema --markdown`; a test fails
when this file is out of date. The JSON Schemas (`proxy/schemas/`, `python -m proxy schema
config|policy`) carry the same descriptions for editors. `config.example.yaml` is a working
example; the README explains what each part does.

In every string of the config, `${VAR}` reads the environment (an unset variable is an error),
`${VAR:-default}` falls back to `default`, and `$$` is a literal `$`. Relative paths are relative
to the config file. Unknown keys are refused. `<id>` stands for a tenant id, `[]` for an item of a
list.
"""


class _Walker:
    def __init__(self, root: Schema) -> None:
        self._defs: dict[str, Schema] = root.get("$defs", {})

    def resolve(self, schema: Schema) -> Schema:
        ref = schema.get("$ref")
        if isinstance(ref, str):
            return self._defs[ref.rsplit("/", 1)[-1]]
        return schema

    def _variants(self, schema: Schema) -> list[Schema]:
        variants = schema.get("anyOf") or schema.get("oneOf")
        return [self.resolve(v) for v in variants] if variants else [self.resolve(schema)]

    @staticmethod
    def _values(mapping: Schema) -> list[Schema]:
        """The schema of a mapping's values (keys free, or keys matching a pattern)."""
        if isinstance(mapping.get("additionalProperties"), dict):
            return [mapping["additionalProperties"]]
        return list(mapping.get("patternProperties", {}).values())

    def type_of(self, schema: Schema) -> str:
        names = []
        for variant in self._variants(schema):
            if "enum" in variant:
                names.append(" \\| ".join(f"`{json.dumps(v)}`" for v in variant["enum"]))
            elif "const" in variant:
                names.append(f"`{json.dumps(variant['const'])}`")
            elif variant.get("type") == "array":
                names.append(f"list of {self.type_of(variant.get('items', {}))}")
            elif variant.get("type") == "object" and "properties" in variant:
                names.append("mapping")
            elif variant.get("type") == "object":
                values = self._values(variant)
                names.append(f"mapping of {self.type_of(values[0])}" if values else "mapping")
            elif variant.get("format") == "path":
                names.append("path")
            else:
                names.append(str(variant.get("type", "any")))
        return " or ".join(names)

    def description_of(self, schema: Schema) -> str:
        text = schema.get("description") or self.resolve(schema).get("description") or ""
        return " ".join(str(text).split())

    def children(self, schema: Schema, path: str) -> Iterator[tuple[str, Schema]]:
        """Each model nested in a key's value, with the path its keys are written under."""
        for variant in self._variants(schema):
            if "properties" in variant:
                yield path, variant
            elif variant.get("type") == "array":
                yield from self.children(variant.get("items", {}), f"{path}[]")
            elif variant.get("type") == "object":
                for value in self._values(variant):
                    yield from self.children(value, f"{path}.<id>")

    def rows(self, model: Schema, path: str) -> Iterator[tuple[str, Schema, bool]]:
        required = set(model.get("required", ()))
        for key, schema in model.get("properties", {}).items():  # in the models' order
            key_path = f"{path}.{key}" if path else key
            yield key_path, schema, key in required
            for child_path, child in self.children(schema, key_path):
                yield from self.rows(child, child_path)


def _default(schema: Schema, required: bool) -> str:
    if required:
        return "required"
    if "default" not in schema:
        return ""
    return f"`{json.dumps(schema['default'])}`"


def _section(title: str, kind: str, lead: str) -> list[str]:
    root = generate(kind)  # type: ignore[arg-type]
    walker = _Walker(root)
    lines = [f"## {title}", "", lead, ""]
    for key, schema in root["properties"].items():
        required = key in root.get("required", ())
        lines += [f"### `{key}`", "", _markdown(walker.description_of(schema)), ""]
        entries = [row for path, child in walker.children(schema, key) for row in walker.rows(child, path)]
        if not entries:  # a key of its own, not a section
            lines += [f"Type: {walker.type_of(schema)}; default: {_default(schema, required) or 'none'}.", ""]
            continue
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for key_path, entry, needed in entries:
            cells = [
                f"`{key_path}`",
                walker.type_of(entry),
                _default(entry, needed),
                _markdown(walker.description_of(entry)),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _markdown(text: str) -> str:
    """A description as table-cell text: pipes escaped, and outside code spans `<` (it would start
    an HTML tag) and `*` (emphasis) too."""
    parts = text.replace("|", "\\|").split("`")
    return "`".join(
        part if index % 2 else part.replace("<", "&lt;").replace("*", "\\*")
        for index, part in enumerate(parts)
    )


def reference_markdown() -> str:
    lines = [_INTRO]
    lines += _section(
        "The config file",
        "config",
        "Given to every command as `--config FILE`; see `config.example.yaml`.",
    )
    lines += _section(
        "Policy files",
        "policy",
        "`policies_dir/NAME.yaml`, named by `tenants.<id>.policy`; see `policies/`. An empty file is "
        "the defaults below.",
    )
    return "\n".join(lines).rstrip("\n") + "\n"
