"""What a client sees of an upstream's answers: the `data` the protocol defines for an error code
(a resource's `data.uri`, checked like any URI the caller is shown), and an upstream's Retry-After."""

from __future__ import annotations

import email.utils
from typing import Any

import pytest

from proxy.protocol.errors import (
    MAX_ERROR_URI,
    MAX_RETRY_AFTER_SECONDS,
    TooManyRequests,
    UnknownResource,
    UpstreamUnavailable,
    retry_after_seconds,
    sanitize_error,
    upstream_asked_to_wait,
)


def nothing_hidden(text: str) -> bool:
    return False


def globex_hidden(text: str) -> bool:
    return "globex" in text


def sanitized(error: Any, hidden: Any = nothing_hidden) -> dict[str, Any]:
    return dict(sanitize_error(error, hidden))


def test_a_missing_resources_uri_is_kept_for_both_resource_not_found_codes() -> None:
    sep_2164 = {
        "code": -32602,
        "message": "Unknown resource: notes://acme/x",
        "data": {"uri": "notes://acme/x"},
    }
    assert sanitized(sep_2164) == sep_2164
    earlier = {
        "code": -32002,
        "message": "Resource not found at /srv/app.py:12",
        "data": {"uri": "file:///x"},
    }
    # -32002 is in the implementation-defined range: its message stays generic, its data.uri passes.
    assert sanitized(earlier) == {
        "code": -32002,
        "message": "Upstream server error",
        "data": {"uri": "file:///x"},
    }


@pytest.mark.parametrize(
    "data",
    [
        {"uri": 7},
        {"uri": ["notes://acme/x"]},
        {"uri": ""},
        {"uri": "no scheme"},
        {"uri": "noscheme"},
        {"uri": "notes://acme/x y"},
        {"uri": "notes://acme/x\ny"},
        {"uri": "notes://acme/\u202ex"},  # a bidi override: not printable
        {"uri": "notes://acme/" + "x" * MAX_ERROR_URI},
        "notes://acme/x",
        ["notes://acme/x"],
    ],
)
def test_a_data_uri_of_the_wrong_type_or_size_is_dropped(data: Any) -> None:
    assert "data" not in sanitized({"code": -32602, "message": "Unknown resource", "data": data})


def test_only_the_uri_of_the_data_is_kept() -> None:
    error = {"code": -32602, "message": "m", "data": {"uri": "a://b", "trace": "/srv/app.py", "uri2": "x"}}
    assert sanitized(error)["data"] == {"uri": "a://b"}


def test_other_codes_keep_no_uri_and_the_mcp_codes_keep_their_data_as_before() -> None:
    for code in (-32603, -32601, -32600, -32000, -32005):
        assert "data" not in sanitized({"code": code, "message": "m", "data": {"uri": "a://b"}})
    unsupported = {"code": -32022, "message": "Unsupported", "data": {"supported": ["2025-11-25"]}}
    assert sanitized(unsupported) == unsupported


def test_a_uri_the_caller_may_not_see_is_dropped_and_a_message_naming_it_replaced() -> None:
    error = {
        "code": -32602,
        "message": "Unknown resource: notes://globex/secret",
        "data": {"uri": "notes://globex/secret"},
    }
    assert sanitized(error, globex_hidden) == {"code": -32602, "message": "Upstream error"}
    own = {"code": -32602, "message": "Unknown resource: notes://acme/x", "data": {"uri": "notes://acme/x"}}
    assert sanitized(own, globex_hidden) == own
    mixed = {"code": -32602, "message": "gone", "data": {"uri": "https://x/?u=notes://globex/a"}}
    assert sanitized(mixed, globex_hidden) == {"code": -32602, "message": "gone"}


def test_the_proxys_own_unknown_resource_answer_looks_like_an_upstreams() -> None:
    uri = "notes://globex/plan"
    own = UnknownResource.named(uri).to_jsonrpc(1)["error"]
    upstream = sanitized({"code": -32602, "message": f"Unknown resource: {uri}", "data": {"uri": uri}})
    assert own == upstream
    long_uri = "notes://globex/" + "x" * (MAX_ERROR_URI + 1)
    own = UnknownResource.named(long_uri).to_jsonrpc(1)["error"]
    message = f"Unknown resource: {long_uri}"
    upstream = sanitized({"code": -32602, "message": message, "data": {"uri": long_uri}})
    assert own == upstream and "data" not in own


NOW = 1_800_000_000.0


def http_date(offset: float) -> str:
    return email.utils.formatdate(NOW + offset, usegmt=True)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("7", 7),
        (" 7 ", 7),
        ("0", 0),
        ("3600", 3600),
        ("3601", MAX_RETRY_AFTER_SECONDS),
        ("9" * 40, MAX_RETRY_AFTER_SECONDS),
        (http_date(30), 30),
        (http_date(-30), 0),  # a moment already past: retry now
        (http_date(86_400), MAX_RETRY_AFTER_SECONDS),
        (None, None),
        ("", None),
        ("-1", None),
        ("7.5", None),
        ("7s", None),
        ("soon", None),
        ("\u0663", None),  # an Arabic-Indic digit: not delay-seconds
        ("Fri, 15 Jan 2027 08:00:00 +0200", None),  # not GMT: not an HTTP date
        ("Fri, 15 Jan 2027 08:00:00", None),
        ("Fri, 99 Jan 2027 08:00:00 GMT", None),
    ],
)
def test_retry_after_is_seconds_or_an_http_date_bounded_and_anything_else_ignored(
    value: str | None, seconds: int | None
) -> None:
    assert retry_after_seconds(value, NOW) == seconds


def test_an_upstream_429_or_503_that_says_when_becomes_the_proxys_own_answer() -> None:
    busy = upstream_asked_to_wait(429, "7")
    assert isinstance(busy, TooManyRequests) and busy.status == 429
    assert busy.headers == {"Retry-After": "7"}
    assert busy.data == {"limit": "upstream", "retryAfterSeconds": 7}
    assert "upstream" in busy.message and "7 s" in busy.message
    down = upstream_asked_to_wait(503, "120")
    assert isinstance(down, UpstreamUnavailable) and down.status == 503
    assert down.headers == {"Retry-After": "120"}
    for status, value in ((429, None), (429, "later"), (503, ""), (500, "7"), (502, "7"), (200, "7")):
        assert upstream_asked_to_wait(status, value) is None
