"""What one message becomes in the other protocol era: pure functions, no I/O (tested from tables).

2026-07-28 (per request)                      handshake era (per session)
_meta protocolVersion, clientCapabilities,    initialize: protocolVersion, capabilities,
  clientInfo                                    clientInfo
_meta logLevel                                logging/setLevel (here: log messages filtered)
server/discover                               the initialize result
resultType, ttlMs, cacheScope on results      absent
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from typing import Any, Final

from proxy.bridge.declared import Declared
from proxy.layers.cache.store import HINTED_METHODS
from proxy.layers.containment.extensions import TASKS_EXTENSION
from proxy.protocol.headers import CLIENT_CAPABILITIES_META, PROTOCOL_VERSION_META
from proxy.types import HANDSHAKE_VERSIONS, LATEST_MODERN_VERSION, JsonObject

CLIENT_INFO_META: Final = "io.modelcontextprotocol/clientInfo"
LOG_LEVEL_META: Final = "io.modelcontextprotocol/logLevel"
SERVER_INFO_META: Final = "io.modelcontextprotocol/serverInfo"
PROGRESS_TOKEN: Final = "progressToken"  # noqa: S105 - a field name
# What 2026-07-28 says in every request's _meta and the handshake era says once, in initialize.
ENVELOPE_META: Final = frozenset(
    {PROTOCOL_VERSION_META, CLIENT_CAPABILITIES_META, CLIENT_INFO_META, LOG_LEVEL_META}
)
HANDSHAKE_VERSION: Final = "2025-11-25"  # what the proxy asks a handshake-era upstream for
SUPPORTED_VERSIONS: Final = [LATEST_MODERN_VERSION, *sorted(HANDSHAKE_VERSIONS)]
LOG_LEVELS: Final = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
MODERN_ONLY_RESULT_KEYS: Final = ("resultType", "ttlMs", "cacheScope")
PROXY_CLIENT_INFO: Final = {"name": "mcp-tenant-proxy", "version": "bridge"}
# The client capability each server-to-client request needs.
ASKS: Final = {
    "sampling/createMessage": "sampling",
    "elicitation/create": "elicitation",
    "roots/list": "roots",
}


def member(value: Any, key: str) -> JsonObject:
    """The object at `key` of a JSON object (params of a message, _meta of params), or {}."""
    found = value.get(key) if isinstance(value, dict) else None
    return found if isinstance(found, dict) else {}


def meta_of(params: Any) -> JsonObject:
    return member(params, "_meta")


# --- 2026-07-28 client -> handshake-era upstream ------------------------------------------------


def handshake_params(params: Any, progress_token: str | None) -> JsonObject:
    """A modern request's params as a held session sends them: the envelope left out (the session
    said it in initialize) and the progress token replaced by one unique on that session."""
    if not isinstance(params, dict):
        return {}
    meta = {k: v for k, v in meta_of(params).items() if k not in ENVELOPE_META}
    if PROGRESS_TOKEN in meta:
        if progress_token is None:
            del meta[PROGRESS_TOKEN]
        else:
            meta[PROGRESS_TOKEN] = progress_token
    out = {k: v for k, v in params.items() if k not in ("_meta", "requestState", "inputResponses")}
    if meta:
        out["_meta"] = meta
    return out


def modern_result(method: str | None, result: JsonObject) -> JsonObject:
    """A handshake result as 2026-07-28 shapes it: resultType, and the cache hints its methods carry
    (0 and private: a bridged answer is never offered for caching unless the policy says so)."""
    shaped = {"resultType": "complete", **result}
    if method in HINTED_METHODS:
        shaped.setdefault("ttlMs", 0)
        shaped.setdefault("cacheScope", "private")
    return shaped


def modern_answer(client_id: Any, method: str | None, answer: JsonObject) -> JsonObject:
    """The upstream's answer to a bridged request, as the client's request's answer."""
    shaped: JsonObject = {"jsonrpc": "2.0", "id": client_id}
    result = answer.get("result")
    if isinstance(result, dict):
        shaped["result"] = modern_result(method, result)
    else:
        shaped["error"] = answer.get("error")  # (the relay keeps its code, never its internals)
    return shaped


def call_notification(
    message: JsonObject, upstream_token: str, client_token: Any, log_level: Any
) -> JsonObject | None:
    """What of a call's notifications a 2026-07-28 client gets: its progress (under its own token),
    and the log messages it asked for; nothing else is about the request."""
    method, params = message.get("method"), message.get("params")
    if method == "notifications/progress" and isinstance(params, dict):
        if client_token is None or params.get(PROGRESS_TOKEN) != upstream_token:
            return None
        return {**message, "params": {**params, PROGRESS_TOKEN: client_token}}
    if method == "notifications/message" and log_wanted(log_level, message):
        return message
    return None


def for_the_client(request: JsonObject, declared: JsonObject) -> bool:
    """Whether a server request during a call goes to the client: one its declared capabilities
    (as the held session was initialized with them) offer."""
    method = request.get("method")
    return isinstance(method, str) and ASKS.get(method) in declared


def answered_here(request: JsonObject) -> JsonObject:
    """The proxy's answer to a server request not for the client: ping, else -32601."""
    if request.get("method") == "ping":
        return {"jsonrpc": "2.0", "id": request.get("id"), "result": {}}
    error = {
        "code": -32601,
        "message": f"Method not found: the client does not offer {request.get('method')}",
    }
    return {"jsonrpc": "2.0", "id": request.get("id"), "error": error}


def discover_result(initialize_result: JsonObject) -> JsonObject:
    """server/discover answered from a held session's initialize result."""
    capabilities = initialize_result.get("capabilities")
    capabilities = (
        {k: v for k, v in capabilities.items() if k != "tasks"} if isinstance(capabilities, dict) else {}
    )
    result: JsonObject = {
        "resultType": "complete",
        "supportedVersions": SUPPORTED_VERSIONS,
        "capabilities": capabilities,
        "ttlMs": 0,
        "cacheScope": "private",
    }
    if isinstance(initialize_result.get("instructions"), str):
        result["instructions"] = initialize_result["instructions"]
    if isinstance(initialize_result.get("serverInfo"), dict):
        result["_meta"] = {SERVER_INFO_META: initialize_result["serverInfo"]}
    return result


def log_wanted(opt_in: Any, notification: JsonObject) -> bool:
    """2026-07-28 log messages reach only requests that opted in, at or above their level."""
    if opt_in not in LOG_LEVELS:
        return False
    params = notification.get("params")
    level = params.get("level") if isinstance(params, dict) else None
    return level in LOG_LEVELS and LOG_LEVELS.index(level) >= LOG_LEVELS.index(opt_in)


# --- handshake-era client -> 2026-07-28 upstream ------------------------------------------------

REVERSE_PREFIX: Final = "mtp-bridge."


def reverse_session_token(kept: Declared) -> str:
    """The upstream session id of a session the proxy keeps itself: what every forwarded request's
    _meta is built from (kept in the session record, so every replica can build it: only what the
    bridge keeps of the client's declarations, bounded), and a nonce (two sessions with the same
    client are two sessions)."""
    state = {"c": kept.capabilities, "i": kept.client_info, "n": secrets.token_hex(8)}
    raw = json.dumps(state, sort_keys=True, separators=(",", ":")).encode()
    return REVERSE_PREFIX + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def reverse_session_state(token: str | None) -> tuple[JsonObject, JsonObject] | None:
    """(client capabilities, client info) of a reverse-bridged session, or None for any other id."""
    if token is None or not token.startswith(REVERSE_PREFIX):
        return None
    text = token[len(REVERSE_PREFIX) :]
    try:
        state = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, binascii.Error):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("c"), dict):
        return None
    info = state.get("i")
    return state["c"], info if isinstance(info, dict) else dict(PROXY_CLIENT_INFO)


def without_tasks(capabilities: JsonObject) -> JsonObject:
    """Capabilities (a client's or a server's) without tasks: task handles are not bridged, so
    neither side is told the other can use them (an upstream told so answers plain calls with a
    task the handshake client could never get or cancel)."""
    kept = {key: value for key, value in capabilities.items() if key != "tasks"}
    extensions = kept.get("extensions")
    if isinstance(extensions, dict) and TASKS_EXTENSION in extensions:
        kept["extensions"] = {name: value for name, value in extensions.items() if name != TASKS_EXTENSION}
    return kept


def modern_envelope(capabilities: JsonObject, client_info: JsonObject, log_level: str | None) -> JsonObject:
    meta: JsonObject = {
        PROTOCOL_VERSION_META: LATEST_MODERN_VERSION,
        CLIENT_CAPABILITIES_META: without_tasks(capabilities),
        CLIENT_INFO_META: client_info,
    }
    if log_level is not None:
        meta[LOG_LEVEL_META] = log_level
    return meta


def handshake_result(result: JsonObject) -> JsonObject:
    """A 2026-07-28 result as a handshake-era client reads it (no resultType or cache hints)."""
    return {k: v for k, v in result.items() if k not in MODERN_ONLY_RESULT_KEYS}


def initialize_result(requested: Any, discover: JsonObject) -> JsonObject:
    """initialize answered from the upstream's server/discover: the version the client asked for
    when the proxy speaks it (else the newest handshake one), the server's capabilities and name."""
    version = requested if requested in HANDSHAKE_VERSIONS else HANDSHAKE_VERSION
    capabilities = discover.get("capabilities")
    server_info = meta_of(discover).get(SERVER_INFO_META)
    result: JsonObject = {
        "protocolVersion": version,
        "capabilities": without_tasks(capabilities) if isinstance(capabilities, dict) else {},
        "serverInfo": server_info
        if isinstance(server_info, dict)
        else {"name": "mcp-server", "version": "unknown"},
    }
    if isinstance(discover.get("instructions"), str):
        result["instructions"] = discover["instructions"]
    return result
