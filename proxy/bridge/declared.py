"""What the bridge keeps of what a client declares about itself: its capabilities and clientInfo.

The bridge keeps a client's declarations beyond its request: a held upstream session is opened
with them (and found again by them), and a session the proxy keeps for a handshake-era client
carries them in its record (in Redis with the Redis backend), so every replica can build the
`_meta` of its requests. A client chooses these values, so only what the bridge acts on is kept:

    capabilities   the members MCP defines (roots, sampling, elicitation, tasks), each reduced to
                   the members MCP defines for it (flags kept as {}, roots.listChanged as a
                   boolean), and the extensions the policy lets through with their settings;
                   `experimental` and unknown members are dropped (the proxy enforces nothing of
                   them, so they change nothing it forwards)
    clientInfo     name, version and title (strings); description, icons and the rest dropped

and what is kept is bounded in bytes: beyond MAX_DECLARED_BYTES the request is refused (-32602),
before any upstream call and with nothing stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from proxy.protocol.errors import DeclaredTooLarge
from proxy.types import JsonObject

# What a real client declares is a few hundred bytes; this leaves room for extension settings.
MAX_DECLARED_BYTES: Final = 2048
_FLAG: Final[JsonObject] = {}  # an object MCP defines with no members the proxy reads: kept as {}
# The client capabilities of the handshake era (2025-11-25) and 2026-07-28, as nested shapes:
# a dict names the members kept, bool a boolean kept as it is.
_SHAPES: Final[JsonObject] = {
    "roots": {"listChanged": bool},
    "sampling": {"context": _FLAG, "tools": _FLAG},
    "elicitation": {"form": _FLAG, "url": _FLAG},
    "tasks": {
        "list": _FLAG,
        "cancel": _FLAG,
        "requests": {"sampling": {"createMessage": _FLAG}, "elicitation": {"create": _FLAG}},
    },
}
_CLIENT_INFO_MEMBERS: Final = ("name", "version", "title")


@dataclass(frozen=True)
class Declared:
    """A client's capabilities and clientInfo as the bridge keeps them."""

    capabilities: JsonObject
    client_info: JsonObject | None  # None: the client gave none (the proxy's own is used)

    @property
    def key(self) -> str:
        """The capabilities' canonical form: one held session per caller and key."""
        return json.dumps(self.capabilities, sort_keys=True, separators=(",", ":"))


def declared(capabilities: Any, client_info: Any) -> Declared:
    """What is kept of a client's declarations; DeclaredTooLarge (-32602) when that is more than the bound."""
    kept = Declared(_capabilities(capabilities), _client_info(client_info))
    size = len(json.dumps([kept.capabilities, kept.client_info], separators=(",", ":")).encode())
    if size > MAX_DECLARED_BYTES:
        raise DeclaredTooLarge(
            f"Invalid params: the client's capabilities and clientInfo come to {size} bytes where the "
            f"proxy keeps at most {MAX_DECLARED_BYTES} (experimental and unknown capabilities, and "
            "clientInfo beyond name, version and title, are not counted)",
            data={"limit": "declared_bytes", "max": MAX_DECLARED_BYTES},
        )
    return kept


def _capabilities(capabilities: Any) -> JsonObject:
    if not isinstance(capabilities, dict):
        return {}
    # (what is looked up is what is kept: the cost does not grow with what the client sent)
    kept = {name: _shaped(capabilities[name], _SHAPES[name]) for name in _SHAPES if name in capabilities}
    extensions = capabilities.get("extensions")  # (the policy has left only those it allows)
    if isinstance(extensions, dict):
        kept["extensions"] = {name: value for name, value in extensions.items() if isinstance(value, dict)}
    return {name: value for name, value in kept.items() if value is not None}


def _shaped(value: Any, shape: Any) -> Any:
    """`value` reduced to `shape` (None: not of that shape, left out)."""
    if shape is bool:
        return value if isinstance(value, bool) else None
    if not isinstance(value, dict):
        return None
    kept = {name: _shaped(value[name], inner) for name, inner in shape.items() if name in value}
    return {name: inner for name, inner in kept.items() if inner is not None}


def _client_info(client_info: Any) -> JsonObject | None:
    if not isinstance(client_info, dict):
        return None
    kept = {name: client_info.get(name) for name in _CLIENT_INFO_MEMBERS}
    return {name: value for name, value in kept.items() if isinstance(value, str)}
