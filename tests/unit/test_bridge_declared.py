"""What the bridge keeps of a client's declarations (proxy/bridge/declared.py), from tables."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.bridge.declared import MAX_DECLARED_BYTES, declared
from proxy.protocol.errors import InvalidParams

FULL = {
    "roots": {"listChanged": True},
    "sampling": {"context": {}, "tools": {}},
    "elicitation": {"form": {}, "url": {}},
    "tasks": {"list": {}, "cancel": {}, "requests": {"elicitation": {"create": {}}}},
    "extensions": {"io.modelcontextprotocol/ui": {"mimeTypes": ["text/html;profile=mcp-app"]}},
}


@pytest.mark.parametrize(
    ("capabilities", "kept"),
    [
        (FULL, FULL),
        ({"experimental": {"x1": {}}, "elicitation": {}}, {"elicitation": {}}),
        ({"madeUp": {"a": 1}}, {}),
        ({"sampling": {"tools": {"x": 1}, "extra": {}}}, {"sampling": {"tools": {}}}),
        ({"roots": {"listChanged": "yes", "x": {}}}, {"roots": {}}),
        (
            {"elicitation": "yes", "tasks": {"requests": {"sampling": {"other": {}}}}},
            {"tasks": {"requests": {"sampling": {}}}},
        ),
        (
            {"extensions": {"io.example/a": {"k": "v"}, "io.example/b": 3}},
            {"extensions": {"io.example/a": {"k": "v"}}},
        ),
        ("not an object", {}),
    ],
)
def test_only_the_capabilities_mcp_defines_are_kept(capabilities: Any, kept: Any) -> None:
    assert declared(capabilities, None).capabilities == kept


def test_capabilities_differing_only_in_what_is_not_kept_have_one_key() -> None:
    plain = declared({"elicitation": {}}, {"name": "a", "version": "1"})
    assert declared({"elicitation": {}, "experimental": {"x9": {}}}, None).key == plain.key
    assert declared({"experimental": {"y": {}}, "elicitation": {}, "unknown": 1}, None).key == plain.key
    assert declared({"elicitation": {}, "sampling": {}}, None).key != plain.key


def test_client_info_keeps_name_version_and_title() -> None:
    info = {"name": "c", "version": "1", "title": "C", "description": "d" * 10_000, "icons": [{"src": "x"}]}
    assert declared({}, info).client_info == {"name": "c", "version": "1", "title": "C"}
    assert declared({}, {"name": 3, "version": "1"}).client_info == {"version": "1"}
    assert declared({}, "nope").client_info is None


def test_what_is_kept_is_bounded_and_more_is_refused() -> None:
    assert declared(
        {"experimental": {"x": {"blob": "A" * 3_000_000}}}, {"name": "c", "description": "d" * 10**6}
    )
    with pytest.raises(InvalidParams) as big_info:
        declared({}, {"name": "n" * MAX_DECLARED_BYTES, "version": "1"})
    assert big_info.value.code == -32602
    assert big_info.value.data == {"limit": "declared_bytes", "max": MAX_DECLARED_BYTES}
    with pytest.raises(InvalidParams):
        declared({"extensions": {"io.example/a": {"blob": "B" * MAX_DECLARED_BYTES}}}, None)
