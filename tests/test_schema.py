"""The shipped JSON Schemas are the ones the loader's models generate, and they accept the examples."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from proxy.ops.schema import Kind, generate, schema_text, shipped

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("kind", ["config", "policy"])
def test_shipped_schema_is_the_generated_one(kind: Kind) -> None:
    assert shipped(kind) == schema_text(kind), f"regenerate: python -m proxy schema {kind}"


def test_examples_validate_and_reference_their_schema() -> None:
    config_text = (ROOT / "config.example.yaml").read_text()
    assert config_text.startswith("# yaml-language-server: $schema=proxy/schemas/config.schema.json")
    jsonschema.validate(yaml.safe_load(config_text), generate("config"))
    for policy in (ROOT / "policies").glob("*.yaml"):
        jsonschema.validate(yaml.safe_load(policy.read_text()) or {}, generate("policy"))
    configs, policies = list((ROOT / "examples").glob("*.yaml")), list((ROOT / "examples").glob("*/*.yaml"))
    assert configs and policies
    for config in configs:
        text = config.read_text()
        assert text.startswith("# yaml-language-server: $schema=../proxy/schemas/config.schema.json")
        jsonschema.validate(yaml.safe_load(text), generate("config"))
    for policy in policies:
        text = policy.read_text()
        assert text.startswith("# yaml-language-server: $schema=../../proxy/schemas/policy.schema.json")
        jsonschema.validate(yaml.safe_load(text) or {}, generate("policy"))


def test_the_schema_refuses_what_the_loader_refuses() -> None:
    schema = generate("policy")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"tenant_arguments": {"on_mismatch": "sometimes"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"tools": {"unknown": 1}}, schema)
    assert json.loads(shipped("config"))["title"] == "mcp-tenant-proxy config"


def _undescribed(kind: Kind) -> list[str]:
    """Keys (as `Model.key`) that neither carry a description nor point at a described model."""
    schema = generate(kind)
    definitions = schema.get("$defs", {})

    def described(entry: dict[str, object]) -> bool:
        if entry.get("description"):
            return True
        ref = entry.get("$ref")
        return isinstance(ref, str) and bool(definitions[ref.rsplit("/", 1)[-1]].get("description"))

    missing = []
    for name, model in [("root", schema), *definitions.items()]:
        for key, entry in model.get("properties", {}).items():
            if not described(entry):
                missing.append(f"{name}.{key}")
    return missing


@pytest.mark.parametrize("kind", ["config", "policy"])
def test_every_key_has_a_description_for_editors(kind: Kind) -> None:
    assert _undescribed(kind) == []


def test_the_configuration_reference_is_generated_from_the_models() -> None:
    from proxy.ops.reference import reference_markdown

    shipped_doc = (ROOT / "docs" / "configuration.md").read_text()
    assert shipped_doc == reference_markdown(), "regenerate: python -m proxy schema --markdown"
    for key in ("tenants.<id>.upstream.inherit_env", "auth.issuers[].jwks_url", "client_capabilities.roots"):
        row = next(line for line in shipped_doc.splitlines() if line.startswith(f"| `{key}` |"))
        assert row.split(" | ")[-1].strip(" |"), f"{key} has no description in the reference"


def test_no_file_points_at_a_document_the_repository_does_not_have() -> None:
    """README, --help and comments point to README.md and docs/, which ship with the code."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    missing_doc = "CONTRACT" + ".md"
    offenders = [
        name
        for name in tracked
        if (ROOT / name).is_file()
        and not name.startswith("tests/interop/package")
        and missing_doc in (ROOT / name).read_text(errors="replace")
    ]
    assert offenders == []
