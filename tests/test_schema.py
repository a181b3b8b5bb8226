"""The shipped JSON Schemas are the ones the loader's models generate, and they accept the examples."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from proxy.ops.schema import generate, schema_text, shipped

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("kind", ["config", "policy"])
def test_shipped_schema_is_the_generated_one(kind: str) -> None:
    assert shipped(kind) == schema_text(kind), f"regenerate: python -m proxy schema {kind}"  # type: ignore[arg-type]


def test_examples_validate_and_reference_their_schema() -> None:
    config_text = (ROOT / "config.example.yaml").read_text()
    assert config_text.startswith("# yaml-language-server: $schema=proxy/schemas/config.schema.json")
    jsonschema.validate(yaml.safe_load(config_text), generate("config"))
    for policy in (ROOT / "policies").glob("*.yaml"):
        jsonschema.validate(yaml.safe_load(policy.read_text()) or {}, generate("policy"))


def test_the_schema_refuses_what_the_loader_refuses() -> None:
    schema = generate("policy")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"tenant_arguments": {"on_mismatch": "sometimes"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"tools": {"unknown": 1}}, schema)
    assert json.loads(shipped("config"))["title"] == "mcp-tenant-proxy config"
