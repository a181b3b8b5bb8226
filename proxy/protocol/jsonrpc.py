"""JSON-RPC parsing and the MCP method tables the proxy enforces.

A body is parsed once, strictly: UTF-8 only, no duplicate keys, no NaN/Infinity, exactly one
message (batches are refused). What goes upstream is the proxy's own re-serialisation, so an
upstream parser can never read a different message than the one the proxy checked.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass
from typing import Any, Final

import orjson

from proxy.protocol.errors import BadRequest, InvalidParams, ParseError
from proxy.types import Era, JsonObject, RequestId

MODERN_REQUESTS: Final = frozenset(
    {
        "server/discover",
        "subscriptions/listen",
        "tools/list",
        "tools/call",
        "prompts/list",
        "prompts/get",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "completion/complete",
        # the tasks extension (io.modelcontextprotocol/tasks): ids bound by layers/sessions/tasks.py
        "tasks/get",
        "tasks/update",
        "tasks/cancel",
    }
)
HANDSHAKE_REQUESTS: Final = frozenset(
    {
        "initialize",
        "ping",
        "logging/setLevel",
        "tools/list",
        "tools/call",
        "prompts/list",
        "prompts/get",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "resources/subscribe",
        "resources/unsubscribe",
        "completion/complete",
        # 2025-11-25 experimental tasks: ids bound by layers/sessions/tasks.py
        "tasks/get",
        "tasks/result",
        "tasks/list",
        "tasks/cancel",
    }
)
MODERN_NOTIFICATIONS: Final = frozenset({"notifications/cancelled"})
HANDSHAKE_NOTIFICATIONS: Final = frozenset(
    {
        "notifications/initialized",
        "notifications/cancelled",
        "notifications/progress",
        "notifications/roots/list_changed",
    }
)
KNOWN_METHODS: Final = {
    Era.MODERN: MODERN_REQUESTS | MODERN_NOTIFICATIONS,
    Era.HANDSHAKE: HANDSHAKE_REQUESTS | HANDSHAKE_NOTIFICATIONS,
}

# params key whose value is mirrored in the Mcp-Name header (modern era).
NAME_BEARING_METHODS: Final = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
# Requests about one task, named by params.taskId (in Mcp-Name too, in the modern era).
TASK_ID_METHODS: Final = frozenset({"tasks/get", "tasks/update", "tasks/cancel", "tasks/result"})

METHOD_NOT_FOUND: Final = -32601


class MessageKind(enum.Enum):
    REQUEST = "request"
    NOTIFICATION = "notification"
    RESPONSE = "response"  # a client's answer to a server-to-client request


@dataclass(slots=True)
class Message:
    """One parsed JSON-RPC message from a client; `body` is the object the proxy will forward."""

    kind: MessageKind
    body: JsonObject
    method: str | None
    id: RequestId | None

    @property
    def params(self) -> JsonObject:
        params = self.body.get("params")
        return params if isinstance(params, dict) else {}

    def summary(self) -> Message:
        """What a session keeps of a request in flight (its id, method and name), not its body."""
        params: JsonObject = {}
        key = NAME_BEARING_METHODS.get(self.method or "")
        if key is not None and self.name is not None:
            params[key] = self.name
        body: JsonObject = {"jsonrpc": "2.0", "id": self.id, "method": self.method, "params": params}
        return Message(self.kind, body, self.method, self.id)

    @property
    def name(self) -> str | None:
        """The tool or prompt name, or resource URI, this request is about."""
        key = NAME_BEARING_METHODS.get(self.method or "")
        if key is None:
            return None
        value = self.params.get(key)
        return value if isinstance(value, str) else None


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> JsonObject:
    result: JsonObject = {}
    for key, value in pairs:
        if key in result:
            raise ParseError(f"Parse error: duplicate key {key[:64]!r} in a JSON object")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ParseError(f"Parse error: {name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: valid JSON, but no double can carry it
        raise ParseError(f"Parse error: the number {text[:40]} is out of range")
    return value


_decoder = json.JSONDecoder(
    object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant, parse_float=_finite_float
)


def loads_strict(raw: bytes) -> Any:
    """Parse JSON strictly; every failure is a ParseError with a message that says why."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError("Parse error: the body is not valid UTF-8") from None
    try:
        return _decoder.decode(text)
    except json.JSONDecodeError as exc:
        raise ParseError(f"Parse error: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise ParseError("Parse error: the JSON is nested too deeply") from None
    except ValueError:  # an integer beyond the interpreter's digit limit
        raise ParseError("Parse error: a number in the JSON is too long") from None


# What upstreams send: parsed at C speed (no per-object hook; the proxy re-serialises anything it
# passes on), but still without NaN, Infinity or numbers no double can carry.
_upstream_decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def loads_upstream(raw: bytes | str) -> Any:
    """Parse an upstream message; any failure is a ParseError."""
    try:
        return _upstream_decoder.decode(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, digit limits
        raise ParseError("Parse error: malformed upstream message") from None


def dumps(value: Any) -> bytes:
    """Compact JSON bytes, the one serialisation the proxy sends anywhere.

    orjson writes the same compact UTF-8 as the standard library, at several times its speed;
    what it refuses (integers beyond 64 bits, lone surrogates, keys that are not strings) goes
    through the standard library as before. Values come from the strict parsers above, which
    admit no NaN or Infinity, so orjson never has one to write as null.
    """
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError
        pass
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate from a \\ud800 escape: keep it escaped rather than emit invalid UTF-8.
        return json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode("ascii")


MAX_ID_CHARS: Final = 200  # a request id ends up in session state and logs: bounded like any key


def _valid_id(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) <= MAX_ID_CHARS
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def parse_message(raw: bytes) -> Message:
    """Parse a client's POST body into exactly one JSON-RPC message."""
    body = loads_strict(raw)
    if isinstance(body, list):
        raise BadRequest("Invalid request: JSON-RPC batches are not supported; send one message per POST")
    if not isinstance(body, dict):
        raise BadRequest("Invalid request: the body must be a JSON-RPC object")
    if body.get("jsonrpc") != "2.0":
        raise BadRequest('Invalid request: "jsonrpc" must be "2.0"')
    method = body.get("method")
    if "method" in body:
        if not isinstance(method, str) or not method:
            raise BadRequest('Invalid request: "method" must be a non-empty string')
        if "params" in body and not isinstance(body["params"], dict):
            raise InvalidParams('Invalid params: "params" must be an object')
        if "result" in body or "error" in body:
            raise BadRequest("Invalid request: a request cannot carry result or error")
        if "id" not in body:
            return Message(MessageKind.NOTIFICATION, body, method, None)
        if not _valid_id(body["id"]):
            raise BadRequest(
                f'Invalid request: "id" must be a string of at most {MAX_ID_CHARS} characters '
                "or a 64-bit integer"
            )
        return Message(MessageKind.REQUEST, body, method, body["id"])
    if _valid_id(body.get("id")) and (("result" in body) != ("error" in body)):
        return Message(MessageKind.RESPONSE, body, None, body["id"])
    raise BadRequest("Invalid request: not a JSON-RPC request, notification or response")


def answer_bytes(request_id: RequestId | None, result: bytes) -> bytes:
    """A JSON-RPC response around an already serialised result (no second serialisation)."""
    return b'{"jsonrpc":"2.0","id":' + dumps(request_id) + b',"result":' + result + b"}"


def error_body(request_id: RequestId | None, code: int, message: str, data: Any = None) -> JsonObject:
    error: JsonObject = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}
