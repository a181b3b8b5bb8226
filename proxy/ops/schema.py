"""JSON Schemas of the config and policy files, generated from the models the loader validates
with, and shipped in the package (proxy/schemas/) for editors (`# yaml-language-server: $schema=`)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Literal

from proxy.config import ProxyConfig
from proxy.layers.data_access.policy import PolicyFile

Kind = Literal["config", "policy"]
_MODELS: dict[str, Any] = {"config": ProxyConfig, "policy": PolicyFile}
_TITLES = {"config": "mcp-tenant-proxy config", "policy": "mcp-tenant-proxy policy"}


def generate(kind: Kind) -> dict[str, Any]:
    schema: dict[str, Any] = _MODELS[kind].model_json_schema(mode="validation")
    return {**schema, "$schema": "https://json-schema.org/draft/2020-12/schema", "title": _TITLES[kind]}


def schema_text(kind: Kind) -> str:
    return json.dumps(generate(kind), indent=2, sort_keys=True) + "\n"


def shipped(kind: Kind) -> str:
    return resources.files("proxy").joinpath("schemas", f"{kind}.schema.json").read_text(encoding="utf-8")
