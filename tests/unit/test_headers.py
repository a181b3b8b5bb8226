"""Modern-era header rules: value encoding, Mcp-Param-* annotations and checks, the envelope ladder."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.protocol.errors import HeaderMismatch, InvalidParams, UnsupportedProtocolVersion
from proxy.protocol.headers import (
    CLIENT_CAPABILITIES_META,
    PROTOCOL_VERSION_META,
    ParamHeader,
    check_modern_envelope,
    check_param_headers,
    decode_header_value,
    encode_header_value,
    name_header_for,
    param_headers_of,
    render_param_headers,
)
from proxy.protocol.jsonrpc import Message, parse_message

MODERN = "2026-07-28"


def b64(text: str) -> str:
    return f"=?base64?{base64.b64encode(text.encode()).decode()}?="


# --- encode / decode --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["abc", "", "a b", "tools/call", "notes://acme/x?y=1", "~!@#$%^&*()"])
def test_plain_printable_ascii_passes_as_is(value: str) -> None:
    assert encode_header_value(value) == value
    assert decode_header_value(value) == value


@pytest.mark.parametrize(
    "value",
    [
        " leading",
        "trailing ",
        "\tTab",
        "new\nline",
        "cr\rlf",
        "nul\x00",
        "del\x7f",
        "caf\u00e9",
        "\u65e5\u672c",
        "emoji \U0001f600",
        "\u0430cme",  # Cyrillic a
        "=?base64?YQ==?=",  # looks like the sentinel: must be wrapped, or it would decode to "a"
        "=?base64?not base64?=",
        "=?base64??=",
    ],
)
def test_other_values_are_base64_wrapped_and_round_trip(value: str) -> None:
    encoded = encode_header_value(value)
    assert encoded == b64(value)
    assert all(0x20 < ord(c) < 0x7F for c in encoded)
    assert decode_header_value(encoded) == value


@given(st.text(max_size=40))
def test_round_trip_any_text(value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return  # lone surrogates cannot be sent in a header at all
    encoded = encode_header_value(value)
    assert all(0x20 <= ord(c) <= 0x7E for c in encoded)
    assert encoded == encoded.strip()
    assert decode_header_value(encoded) == value


@pytest.mark.parametrize(
    "value",
    [
        "=?base64?YQ?=",  # missing padding
        "=?base64?YR==?=",  # non-canonical trailing bits
        "=?base64?!!!!?=",  # not the alphabet
        "=?base64? YQ==?=",  # whitespace inside
        "=?base64?Y-E=?=",  # urlsafe alphabet
        "=?base64?/w==?=",  # decodes to invalid UTF-8
        "=?base64?7aCA?=",  # decodes to an encoded surrogate
    ],
)
def test_malformed_sentinels_decode_to_none(value: str) -> None:
    assert decode_header_value(value) is None


def test_sentinel_is_case_sensitive_and_anchored() -> None:
    assert decode_header_value("=?BASE64?YQ==?=") == "=?BASE64?YQ==?="
    assert decode_header_value("x=?base64?YQ==?=") == "x=?base64?YQ==?="
    assert decode_header_value("=?base64?YQ==?=x") == "=?base64?YQ==?=x"
    assert decode_header_value("=?base64??=") == ""


# --- param_headers_of -------------------------------------------------------------------------------


def schema(**properties: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties}


def test_valid_annotations_including_nested_paths() -> None:
    found = param_headers_of(
        schema(
            region={"type": "string", "x-mcp-header": "Region"},
            options=schema(
                limit={"type": "integer", "x-mcp-header": "Limit"},
                deep=schema(flag={"type": "boolean", "x-mcp-header": "Flag"}),
            ),
            plain={"type": "string"},
        )
    )
    assert found == (
        ParamHeader(("options", "deep", "flag"), "Flag", "boolean"),
        ParamHeader(("options", "limit"), "Limit", "integer"),
        ParamHeader(("region",), "Region", "string"),
    )
    assert found is not None
    assert [a.header for a in found] == ["Mcp-Param-Flag", "Mcp-Param-Limit", "Mcp-Param-Region"]


@pytest.mark.parametrize("input_schema", [schema(), schema(a={"type": "string"}), {}, None, [], "x"])
def test_no_annotations(input_schema: Any) -> None:
    assert param_headers_of(input_schema) == ()


def test_annotations_outside_a_pure_properties_chain_do_not_count() -> None:
    input_schema = schema(
        items={"type": "array", "items": {"type": "string", "x-mcp-header": "Item"}},
        either={"anyOf": [{"type": "string", "x-mcp-header": "Any"}]},
    )
    assert param_headers_of(input_schema) == ()


@pytest.mark.parametrize(
    "input_schema",
    [
        {"type": "object", "x-mcp-header": "Root", "properties": {}},  # on the root
        schema(a={"type": "array", "x-mcp-header": "A"}),  # not a header type
        schema(a={"type": "object", "x-mcp-header": "A"}),
        schema(a={"type": "number", "x-mcp-header": "A"}),
        schema(a={"x-mcp-header": "A"}),  # no type
        schema(a={"type": "string", "x-mcp-header": "Bad Token"}),
        schema(a={"type": "string", "x-mcp-header": "A:B"}),
        schema(a={"type": "string", "x-mcp-header": ""}),
        schema(a={"type": "string", "x-mcp-header": "\u00e9"}),
        schema(a={"type": "string", "x-mcp-header": 5}),
        schema(a={"type": "string", "x-mcp-header": True}),
        schema(  # duplicate tokens, case-insensitively
            a={"type": "string", "x-mcp-header": "Region"}, b={"type": "string", "x-mcp-header": "region"}
        ),
        schema(ok={"type": "string", "x-mcp-header": "Ok"}, bad={"type": "array", "x-mcp-header": "Bad"}),
    ],
)
def test_any_invalid_annotation_gives_none(input_schema: Any) -> None:
    assert param_headers_of(input_schema) is None


@pytest.mark.parametrize("kind", [["string", "null"], {"const": "string"}])
def test_unhashable_schema_type_on_an_annotation_gives_none(kind: Any) -> None:
    assert param_headers_of(schema(a={"type": kind, "x-mcp-header": "A"})) is None


def test_list_type_without_annotation_is_fine() -> None:
    assert param_headers_of(schema(a={"type": ["string", "null"]})) == ()


# --- check_param_headers ------------------------------------------------------------------------------

REGION = ParamHeader(("region",), "Region", "string")
LIMIT = ParamHeader(("opts", "limit"), "Limit", "integer")
FLAG = ParamHeader(("flag",), "Flag", "boolean")


def test_matching_headers_pass() -> None:
    check_param_headers(
        (REGION, LIMIT, FLAG),
        {"region": "eu-west", "opts": {"limit": 10}, "flag": True},
        {"mcp-param-region": ["eu-west"], "mcp-param-limit": ["10"], "mcp-param-flag": ["true"]},
    )


def test_absent_argument_and_absent_header_pass() -> None:
    check_param_headers((REGION, LIMIT), {}, {})
    check_param_headers((LIMIT,), {"opts": "not-an-object"}, {})


def test_base64_header_matches_non_ascii_argument() -> None:
    check_param_headers((REGION,), {"region": "M\u00fcnchen"}, {"mcp-param-region": [b64("M\u00fcnchen")]})
    check_param_headers((REGION,), {"region": " padded "}, {"mcp-param-region": [b64(" padded ")]})


@pytest.mark.parametrize(
    ("arguments", "sent", "message"),
    [
        (
            {"region": "eu"},
            {},
            "Header mismatch: Mcp-Param-Region is missing but argument 'region' is present",
        ),
        (
            {},
            {"mcp-param-region": ["eu"]},
            "Header mismatch: Mcp-Param-Region is present but argument 'region' is not",
        ),
        (
            {"region": "eu"},
            {"mcp-param-region": ["eu", "eu"]},
            "Header mismatch: Mcp-Param-Region appears more than once",
        ),
        (
            {"region": "eu"},
            {"mcp-param-region": ["us"]},
            "Header mismatch: Mcp-Param-Region does not match argument 'region'",
        ),
        (
            {"region": "eu"},
            {"mcp-param-region": ["EU"]},
            "Header mismatch: Mcp-Param-Region does not match argument 'region'",
        ),
        (
            {"region": "eu"},
            {"mcp-param-region": ["=?base64?ZXU?="]},  # malformed base64 never matches
            "Header mismatch: Mcp-Param-Region does not match argument 'region'",
        ),
        (
            {"region": "=?base64?ZXU=?="},  # the literal sentinel text, sent unwrapped
            {"mcp-param-region": ["=?base64?ZXU=?="]},
            "Header mismatch: Mcp-Param-Region does not match argument 'region'",
        ),
        (
            {"region": {"nested": "eu"}},
            {"mcp-param-region": ["eu"]},
            "Header mismatch: Mcp-Param-Region is present but argument 'region' is not",
        ),
    ],
)
def test_string_mismatches(arguments: dict[str, Any], sent: dict[str, list[str]], message: str) -> None:
    with pytest.raises(HeaderMismatch) as info:
        check_param_headers((REGION,), arguments, sent)
    assert info.value.message == message
    assert (info.value.code, info.value.status) == (HeaderMismatch.code, 400)


@pytest.mark.parametrize(
    ("value", "header"),
    [(10, "10"), (10, "10.0"), (10, "10.000"), (-3, "-3"), (10.0, "10"), (0, "0"), (0, "-0"), (10, "010")],
)
def test_integer_headers_compare_numerically(value: Any, header: str) -> None:
    check_param_headers((LIMIT,), {"opts": {"limit": value}}, {"mcp-param-limit": [header]})


@pytest.mark.parametrize(
    ("value", "header"),
    [
        (10, "10.5"),
        (10, "1e1"),
        (10, "+10"),
        (10, " 10"),
        (10, "11"),
        (10, "0x0a"),
        (True, "1"),
        (10.5, "10"),
    ],
)
def test_integer_headers_that_do_not_match(value: Any, header: str) -> None:
    with pytest.raises(HeaderMismatch, match=r"does not match argument 'opts\.limit'"):
        check_param_headers((LIMIT,), {"opts": {"limit": value}}, {"mcp-param-limit": [header]})


@pytest.mark.parametrize(
    ("value", "header", "ok"),
    [(True, "true", True), (False, "false", True), (True, "True", False), (True, "1", False)],
)
def test_boolean_headers(value: bool, header: str, ok: bool) -> None:
    if ok:
        check_param_headers((FLAG,), {"flag": value}, {"mcp-param-flag": [header]})
    else:
        with pytest.raises(HeaderMismatch):
            check_param_headers((FLAG,), {"flag": value}, {"mcp-param-flag": [header]})


def test_render_param_headers_mirrors_the_body() -> None:
    rendered = render_param_headers(
        (REGION, LIMIT, FLAG), {"region": "caf\u00e9", "opts": {"limit": 5}, "flag": False}
    )
    assert rendered == {
        "Mcp-Param-Region": b64("caf\u00e9"),
        "Mcp-Param-Limit": "5",
        "Mcp-Param-Flag": "false",
    }
    assert render_param_headers((REGION,), {"region": ["list"]}) == {}


# --- check_modern_envelope ------------------------------------------------------------------------------


def request(method: str = "tools/call", meta: Any = "default", **params: Any) -> Message:
    if meta == "default":
        meta = {PROTOCOL_VERSION_META: MODERN, CLIENT_CAPABILITIES_META: {}}
    if meta is not None:
        params["_meta"] = meta
    return parse_message(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode())


def test_a_consistent_request_passes_and_returns_the_version() -> None:
    message = request(name="whoami")
    assert check_modern_envelope(message, MODERN, "tools/call", "whoami") == MODERN


def test_a_base64_name_header_matches() -> None:
    message = request(name="caf\u00e9")
    assert check_modern_envelope(message, MODERN, "tools/call", b64("caf\u00e9")) == MODERN


@pytest.mark.parametrize(
    "meta",
    [
        None,
        "not-an-object",
        {CLIENT_CAPABILITIES_META: {}},
        {PROTOCOL_VERSION_META: MODERN},
    ],
)
def test_rung_1_meta_envelope(meta: Any) -> None:
    with pytest.raises(InvalidParams) as info:
        check_modern_envelope(request(meta=meta, name="x"), MODERN, "tools/call", "x")
    assert (info.value.code, info.value.status) == (-32602, 400)
    assert PROTOCOL_VERSION_META in info.value.message


def test_rung_2_version_header_must_equal_meta() -> None:
    message = request(meta={PROTOCOL_VERSION_META: "2025-11-25", CLIENT_CAPABILITIES_META: {}}, name="x")
    with pytest.raises(HeaderMismatch) as info:
        check_modern_envelope(message, MODERN, "tools/call", "x")
    assert info.value.code == HeaderMismatch.code
    assert "MCP-Protocol-Version does not match" in info.value.message


@pytest.mark.parametrize("method_header", [None, "tools/list", "TOOLS/CALL", "tools/call "])
def test_rung_3_method_header(method_header: str | None) -> None:
    with pytest.raises(HeaderMismatch) as info:
        check_modern_envelope(request(name="x"), MODERN, method_header, "x")
    assert info.value.message == "Header mismatch: Mcp-Method does not match the body's method"


@pytest.mark.parametrize("name_header", [None, "other", "X", "=?base64?eA?=", b64("y")])
def test_rung_4_name_header(name_header: str | None) -> None:
    with pytest.raises(HeaderMismatch) as info:
        check_modern_envelope(request(name="x"), MODERN, "tools/call", name_header)
    assert info.value.message == "Header mismatch: Mcp-Name does not match the body's 'name'"


def test_rung_4_uri_for_resources_read() -> None:
    message = request("resources/read", uri="notes://acme/plan")
    assert check_modern_envelope(message, MODERN, "resources/read", "notes://acme/plan") == MODERN
    with pytest.raises(HeaderMismatch, match="'uri'"):
        check_modern_envelope(message, MODERN, "resources/read", "notes://globex/plan")


def test_methods_without_a_name_ignore_the_name_header() -> None:
    assert check_modern_envelope(request("tools/list"), MODERN, "tools/list", None) == MODERN


@pytest.mark.parametrize("version", ["2025-11-25", "2099-01-01", ""])
def test_rung_5_unsupported_version(version: str) -> None:
    message = request(meta={PROTOCOL_VERSION_META: version, CLIENT_CAPABILITIES_META: {}}, name="x")
    with pytest.raises(UnsupportedProtocolVersion) as info:
        check_modern_envelope(message, version, "tools/call", "x")
    assert (info.value.code, info.value.status) == (UnsupportedProtocolVersion.code, 400)
    assert info.value.data == {"supported": [MODERN], "requested": version}


def test_ladder_order_meta_before_method_before_version() -> None:
    bad_everything = request(meta=None, name="x")
    with pytest.raises(InvalidParams):
        check_modern_envelope(bad_everything, "1999-01-01", "wrong", "wrong")
    wrong_method_and_version = request(
        meta={PROTOCOL_VERSION_META: "1999-01-01", CLIENT_CAPABILITIES_META: {}}, name="x"
    )
    with pytest.raises(HeaderMismatch):
        check_modern_envelope(wrong_method_and_version, "1999-01-01", "wrong", "x")


def test_notifications_skip_the_meta_rung_but_not_the_others() -> None:
    note = parse_message(b'{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1}}')
    assert check_modern_envelope(note, MODERN, "notifications/cancelled", None) == MODERN
    with pytest.raises(HeaderMismatch):
        check_modern_envelope(note, MODERN, "tools/call", None)
    with pytest.raises(UnsupportedProtocolVersion):
        check_modern_envelope(note, None, "notifications/cancelled", None)


def test_name_header_for() -> None:
    assert name_header_for(request(name="whoami")) == "whoami"
    assert name_header_for(request(name=" x")) == b64(" x")
    assert name_header_for(request("tools/list")) is None
    assert name_header_for(request(name=5)) is None
