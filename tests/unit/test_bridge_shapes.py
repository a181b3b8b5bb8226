"""What a message becomes in the other protocol era (proxy/bridge/shapes.py), from tables."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.bridge.declared import Declared
from proxy.bridge.shapes import (
    answered_here,
    call_notification,
    discover_result,
    for_the_client,
    handshake_params,
    handshake_result,
    initialize_result,
    log_wanted,
    modern_answer,
    modern_envelope,
    modern_result,
    reverse_session_state,
    reverse_session_token,
)

ENVELOPE = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {"elicitation": {}},
    "io.modelcontextprotocol/clientInfo": {"name": "c", "version": "1"},
    "io.modelcontextprotocol/logLevel": "info",
}


@pytest.mark.parametrize(
    ("params", "token", "expected"),
    [
        ({"name": "t", "_meta": ENVELOPE}, None, {"name": "t"}),
        (
            {"name": "t", "_meta": {**ENVELOPE, "progressToken": 7}},
            "up-1",
            {"name": "t", "_meta": {"progressToken": "up-1"}},
        ),
        ({"name": "t", "_meta": {"progressToken": 7, "x/y": 1}}, None, {"name": "t", "_meta": {"x/y": 1}}),
        ({"name": "t", "requestState": "s", "inputResponses": {}}, None, {"name": "t"}),
        (None, None, {}),
    ],
)
def test_a_modern_requests_params_on_a_held_session(params: Any, token: str | None, expected: Any) -> None:
    assert handshake_params(params, token) == expected


@pytest.mark.parametrize(
    ("method", "result", "expected"),
    [
        ("tools/call", {"content": []}, {"resultType": "complete", "content": []}),
        (
            "tools/list",
            {"tools": []},
            {"resultType": "complete", "tools": [], "ttlMs": 0, "cacheScope": "private"},
        ),
        (
            "resources/read",
            {"contents": [], "ttlMs": 5},
            {"resultType": "complete", "contents": [], "ttlMs": 5, "cacheScope": "private"},
        ),
    ],
)
def test_a_handshake_result_in_the_modern_shape(method: str, result: Any, expected: Any) -> None:
    assert modern_result(method, result) == expected


def test_an_answer_goes_back_under_the_clients_id() -> None:
    assert modern_answer(3, "tools/call", {"id": "up-1", "result": {}}) == {
        "jsonrpc": "2.0", "id": 3, "result": {"resultType": "complete"}
    }  # fmt: skip
    error = {"code": -32602, "message": "bad"}
    assert modern_answer("a", "tools/call", {"id": "up-1", "error": error})["error"] == error


def progress(token: Any) -> dict[str, Any]:
    return {"method": "notifications/progress", "params": {"progressToken": token, "progress": 1}}


def log(level: str) -> dict[str, Any]:
    return {"method": "notifications/message", "params": {"level": level}}


@pytest.mark.parametrize(
    ("message", "client_token", "level", "expected"),
    [
        (progress("up-1"), 9, None, progress(9)),  # the call's own, under the client's token
        (progress("up-2"), 9, None, None),  # another call's
        (progress("up-1"), None, None, None),  # the client asked for no progress
        (log("info"), None, None, None),  # no log opt-in
        (log("debug"), None, "info", None),
        (log("error"), None, "info", log("error")),
        ({"method": "notifications/resources/updated", "params": {"uri": "x"}}, 9, "debug", None),
    ],
)
def test_what_of_a_calls_notifications_reaches_the_client(
    message: Any, client_token: Any, level: Any, expected: Any
) -> None:
    assert call_notification(message, "up-1", client_token, level) == expected


@pytest.mark.parametrize(
    ("method", "declared", "asked"),
    [
        ("elicitation/create", {"elicitation": {}}, True),
        ("elicitation/create", {"sampling": {}}, False),
        ("sampling/createMessage", {"sampling": {}}, True),
        ("roots/list", {"roots": {}}, True),
        ("ping", {"roots": {}}, False),
        ("tasks/get", {"tasks": {}}, False),
    ],
)
def test_a_server_request_goes_to_the_client_only_when_it_offers_it(
    method: str, declared: Any, asked: bool
) -> None:
    assert for_the_client({"id": 1, "method": method}, declared) is asked


def test_server_requests_not_for_the_client_are_answered_here() -> None:
    assert answered_here({"id": 4, "method": "ping"}) == {"jsonrpc": "2.0", "id": 4, "result": {}}
    assert answered_here({"id": 5, "method": "roots/list"})["error"]["code"] == -32601


def test_log_levels_at_or_above_the_opt_in() -> None:
    def at(level: str) -> dict[str, Any]:
        return {"params": {"level": level}}

    assert log_wanted("warning", at("error")) and log_wanted("warning", at("warning"))
    assert not log_wanted("warning", at("info"))
    assert not log_wanted(None, at("emergency")) and not log_wanted("loud", at("error"))


def test_discover_is_answered_from_the_initialize_result() -> None:
    initialize = {
        "protocolVersion": "2025-11-25",
        "capabilities": {"tools": {"listChanged": True}, "tasks": {"list": {}}},
        "serverInfo": {"name": "s", "version": "2"},
        "instructions": "Be kind",
    }
    assert discover_result(initialize) == {
        "resultType": "complete",
        "supportedVersions": ["2026-07-28", "2025-03-26", "2025-06-18", "2025-11-25"],
        "capabilities": {"tools": {"listChanged": True}},  # tasks are not bridged
        "ttlMs": 0,
        "cacheScope": "private",
        "instructions": "Be kind",
        "_meta": {"io.modelcontextprotocol/serverInfo": {"name": "s", "version": "2"}},
    }


# --- the reverse direction ---------------------------------------------------------------------


def test_a_reverse_session_token_holds_its_clients_capabilities_and_is_its_own() -> None:
    kept = Declared({"sampling": {}}, {"name": "legacy", "version": "1"})
    token = reverse_session_token(kept)
    assert reverse_session_state(token) == ({"sampling": {}}, {"name": "legacy", "version": "1"})
    assert reverse_session_token(kept) != token
    for other in (None, "an-upstream-session", "mtp-bridge.!!!", "mtp-bridge.e30"):
        assert reverse_session_state(other) is None


def test_the_envelope_and_the_result_shapes_of_the_reverse_direction() -> None:
    assert modern_envelope({"roots": {}}, {"name": "c"}, "debug") == {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {"roots": {}},
        "io.modelcontextprotocol/clientInfo": {"name": "c"},
        "io.modelcontextprotocol/logLevel": "debug",
    }
    shaped = {"resultType": "complete", "ttlMs": 0, "cacheScope": "public", "tools": []}
    assert handshake_result(shaped) == {"tools": []}


@pytest.mark.parametrize(
    ("requested", "chosen"), [("2025-06-18", "2025-06-18"), ("2099-01-01", "2025-11-25")]
)
def test_initialize_is_answered_from_discover(requested: str, chosen: str) -> None:
    discover = {
        "capabilities": {"tools": {}},
        "_meta": {"io.modelcontextprotocol/serverInfo": {"name": "m", "version": "3"}},
    }
    assert initialize_result(requested, discover) == {
        "protocolVersion": chosen,
        "capabilities": {"tools": {}},
        "serverInfo": {"name": "m", "version": "3"},
    }
