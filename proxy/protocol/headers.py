"""Header <-> body agreement rules of the modern era (Mcp-Method, Mcp-Name, Mcp-Param-*).

A modern client mirrors parts of the body into headers so intermediaries can route without
parsing. The proxy never routes on a header the body contradicts: a mismatch is refused before
any upstream call, and the Mcp-Param-* headers sent upstream are re-rendered from the body the
proxy forwards (so a rewritten argument and its header always agree).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from proxy.protocol.errors import HeaderMismatch, InvalidParams, UnsupportedProtocolVersion
from proxy.protocol.jsonrpc import NAME_BEARING_METHODS, TASK_ID_METHODS, Message
from proxy.types import MODERN_VERSIONS, JsonObject

PROTOCOL_VERSION_HEADER: Final = "MCP-Protocol-Version"
METHOD_HEADER: Final = "Mcp-Method"
NAME_HEADER: Final = "Mcp-Name"
PARAM_HEADER_PREFIX: Final = "Mcp-Param-"
PROTOCOL_VERSION_META: Final = "io.modelcontextprotocol/protocolVersion"
CLIENT_CAPABILITIES_META: Final = "io.modelcontextprotocol/clientCapabilities"

_B64_SENTINEL = re.compile(r"^=\?base64\?(?P<payload>.*)\?=$")
_HEADER_SAFE = re.compile(r"^[\x20-\x7E]*$")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HEADER_TYPES: Final = frozenset({"string", "integer", "boolean"})
_CANONICAL_DECIMAL = re.compile(r"^-?[0-9]+(\.0+)?$")


def encode_header_value(value: str) -> str:
    """Printable ASCII without edge whitespace passes as is; anything else is base64-wrapped."""
    if _HEADER_SAFE.fullmatch(value) and value == value.strip() and not _B64_SENTINEL.fullmatch(value):
        return value
    return f"=?base64?{base64.b64encode(value.encode('utf-8')).decode('ascii')}?="


def decode_header_value(value: str) -> str | None:
    """Inverse of encode_header_value; a malformed sentinel decodes to None (never matches)."""
    match = _B64_SENTINEL.fullmatch(value)
    if match is None:
        return value
    payload = match.group("payload")
    try:
        decoded = base64.b64decode(payload, validate=True)
    except binascii.Error:
        return None
    if base64.b64encode(decoded).decode("ascii") != payload:
        return None
    try:
        return decoded.decode("utf-8")
    except UnicodeDecodeError:
        return None


@dataclass(frozen=True, slots=True)
class ParamHeader:
    """One `x-mcp-header` annotation: the argument at `path` is mirrored in Mcp-Param-<token>."""

    path: tuple[str, ...]
    token: str
    type: str

    @property
    def header(self) -> str:
        return f"{PARAM_HEADER_PREFIX}{self.token}"


def param_headers_of(input_schema: Any) -> tuple[ParamHeader, ...] | None:
    """The Mcp-Param-* annotations of a tool's inputSchema; None when any annotation is invalid.

    Only annotations reachable through a pure chain of `properties` count (as in the spec); a
    tool whose annotations are invalid is one a conforming client drops, so nothing is mirrored.
    """
    found: list[ParamHeader] = []
    seen: set[str] = set()
    stack: list[tuple[tuple[str, ...], Any]] = [((), input_schema)]
    while stack:
        path, schema = stack.pop()
        if not isinstance(schema, dict):
            continue
        token = schema.get("x-mcp-header")
        if token is not None:
            kind = schema.get("type")
            if (
                not path
                or not isinstance(token, str)
                or not _TOKEN.fullmatch(token)
                or not isinstance(kind, str)
                or kind not in _HEADER_TYPES
                or token.lower() in seen
            ):
                return None
            seen.add(token.lower())
            found.append(ParamHeader(path, token, str(kind)))
        properties = schema.get("properties")
        if isinstance(properties, dict):
            stack.extend(((*path, str(name)), sub) for name, sub in properties.items())
    return tuple(sorted(found, key=lambda item: item.path))


def _value_at(arguments: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = arguments
    for key in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def _render(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        try:
            return str(value)
        except ValueError:  # an int beyond the str conversion limit
            return None
    return None


def render_param_headers(
    annotations: tuple[ParamHeader, ...], arguments: Mapping[str, Any]
) -> dict[str, str]:
    """The Mcp-Param-* headers a conforming client would send for these arguments."""
    headers: dict[str, str] = {}
    for annotation in annotations:
        rendered = _render(_value_at(arguments, annotation.path))
        if rendered is not None:
            headers[annotation.header] = encode_header_value(rendered)
    return headers


def _matches(annotation: ParamHeader, value: Any, rendered: str, decoded: str) -> bool:
    if (
        annotation.type == "integer"
        and not isinstance(value, bool)
        and (isinstance(value, int) or (isinstance(value, float) and value.is_integer()))
        and _CANONICAL_DECIMAL.fullmatch(decoded)
    ):
        return int(decoded.partition(".")[0]) == int(value)
    return decoded == rendered


def check_param_headers(
    annotations: tuple[ParamHeader, ...],
    arguments: Mapping[str, Any],
    sent: Mapping[str, list[str]],
) -> None:
    """Refuse a tools/call whose Mcp-Param-* headers (lowercased name -> values) disagree with its body."""
    for annotation in annotations:
        values = sent.get(annotation.header.lower(), [])
        if len(values) > 1:
            raise HeaderMismatch(f"Header mismatch: {annotation.header} appears more than once")
        value = _value_at(arguments, annotation.path)
        rendered = _render(value)
        argument = ".".join(annotation.path)
        if rendered is None:
            if values:
                raise HeaderMismatch(
                    f"Header mismatch: {annotation.header} is present but argument {argument!r} is not"
                )
            continue
        if not values:
            raise HeaderMismatch(
                f"Header mismatch: {annotation.header} is missing but argument {argument!r} is present"
            )
        decoded = decode_header_value(values[0])
        if decoded is None or not _matches(annotation, value, rendered, decoded):
            raise HeaderMismatch(f"Header mismatch: {annotation.header} does not match argument {argument!r}")


def check_modern_envelope(
    message: Message, version_header: str | None, method_header: str | None, name_header: str | None
) -> str:
    """The modern-era ladder: _meta envelope, then header agreement, then version. Returns the version."""
    meta = message.params.get("_meta")
    if message.kind.value == "request":
        if (
            not isinstance(meta, dict)
            or PROTOCOL_VERSION_META not in meta
            or CLIENT_CAPABILITIES_META not in meta
        ):
            raise InvalidParams(
                "Invalid params: params._meta must carry "
                f"{PROTOCOL_VERSION_META!r} and {CLIENT_CAPABILITIES_META!r}"
            )
        if version_header != meta[PROTOCOL_VERSION_META]:
            raise HeaderMismatch(
                f"Header mismatch: {PROTOCOL_VERSION_HEADER} does not match "
                f"params._meta {PROTOCOL_VERSION_META}"
            )
    if method_header != message.method:
        raise HeaderMismatch(f"Header mismatch: {METHOD_HEADER} does not match the body's method")
    name_key = NAME_BEARING_METHODS.get(message.method or "")
    if name_key is not None:
        body_value = message.params.get(name_key)
        if body_value is not None and (name_header is None or decode_header_value(name_header) != body_value):
            raise HeaderMismatch(f"Header mismatch: {NAME_HEADER} does not match the body's {name_key!r}")
    # A task request's Mcp-Name is the task id; clients that leave it out (fastmcp-tasks) are served,
    # but one that disagrees with the body is refused like any other.
    task_named = message.method in TASK_ID_METHODS and name_header is not None
    if task_named and decode_header_value(name_header or "") != message.params.get("taskId"):
        raise HeaderMismatch(f"Header mismatch: {NAME_HEADER} does not match the body's 'taskId'")
    if version_header not in MODERN_VERSIONS:
        raise UnsupportedProtocolVersion(
            data={"supported": sorted(MODERN_VERSIONS), "requested": version_header}
        )
    return version_header


def name_header_for(message: Message) -> str | None:
    name_key = NAME_BEARING_METHODS.get(message.method or "")
    value = message.params.get(name_key) if name_key else None
    return encode_header_value(value) if isinstance(value, str) else None


def arguments_of(message: Message) -> JsonObject:
    arguments = message.params.get("arguments")
    return arguments if isinstance(arguments, dict) else {}
