"""Reading what a client sent: the POST body as one JSON-RPC message and its protocol era (the
Call -> Request step), and the Accept rule of a GET stream.

    no Mcp-Session-Id, initialize, no modern version header   -> handshake era, initialize
    Mcp-Session-Id or a handshake version header              -> handshake era (session required)
    MCP-Protocol-Version 2026-07-28 or params._meta           -> 2026-07-28: headers must agree
    anything else                                             -> -32022, the versions spoken listed
"""

from __future__ import annotations

import asyncio
import functools

from aiohttp import StreamReader, hdrs

from proxy.flow import Call, Request, parsed
from proxy.http.edge import single_header
from proxy.protocol.errors import (
    BadRequest,
    BodyTooLarge,
    MethodNotFound,
    MissingSession,
    NotAcceptable,
    RequestTimeout,
    UnsupportedMediaType,
    UnsupportedProtocolVersion,
)
from proxy.protocol.headers import (
    METHOD_HEADER,
    NAME_HEADER,
    PROTOCOL_VERSION_HEADER,
    check_modern_envelope,
    name_header_for,
)
from proxy.protocol.jsonrpc import KNOWN_METHODS, Message, MessageKind, parse_message
from proxy.protocol.structure import check_structure
from proxy.types import DEFAULT_HANDSHAKE_VERSION, HANDSHAKE_VERSIONS, MODERN_VERSIONS, Era

SESSION_HEADER = "Mcp-Session-Id"
ALL_VERSIONS = sorted(MODERN_VERSIONS | HANDSHAKE_VERSIONS)
_SINGLE_HEADERS = (PROTOCOL_VERSION_HEADER, METHOD_HEADER, NAME_HEADER, SESSION_HEADER, "Last-Event-ID")


@functools.lru_cache(maxsize=256)
def _media_types(accept: str) -> frozenset[str]:
    """The media types an Accept header lists (clients send the same few headers over and over)."""
    return frozenset(part.split(";")[0].strip().lower() for part in accept.split(","))


def accepts(accept: str, media_type: str) -> bool:
    kinds = _media_types(accept)
    return media_type in kinds or "*/*" in kinds or f"{media_type.split('/')[0]}/*" in kinds


async def read_message(call: Call) -> Message:
    """The body as exactly one JSON-RPC message: media types, size and time bounded first."""
    request = call.request
    if request.content_type != "application/json":
        raise UnsupportedMediaType("Unsupported media type: Content-Type must be application/json")
    accept = ",".join(request.headers.getall(hdrs.ACCEPT, []))
    if not (accepts(accept, "application/json") and accepts(accept, "text/event-stream")):
        raise NotAcceptable("Not acceptable: Accept must list application/json and text/event-stream")
    limit = call.runtime.config.listen.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"Request body too large: the limit is {limit} bytes")
    content = request.content
    if content.is_eof():  # the whole body came with the headers (the usual case): no waiting
        body = content.read_nowait()
        if len(body) > limit:
            raise BodyTooLarge(f"Request body too large: the limit is {limit} bytes")
    else:
        body = await _read_body(content, limit, call.runtime.config.listen.body_timeout_seconds)
    listen = call.runtime.config.listen
    check_structure(body, listen.max_json_members, listen.max_json_depth)
    return parse_message(body)


async def _read_body(content: StreamReader, limit: int, seconds: float) -> bytes:
    body = bytearray()
    try:
        async with asyncio.timeout(seconds):
            async for chunk in content.iter_any():
                body += chunk
                if len(body) > limit:
                    raise BodyTooLarge(f"Request body too large: the limit is {limit} bytes")
    except TimeoutError:
        raise RequestTimeout() from None
    return bytes(body)


def era_of(call: Call, message: Message) -> tuple[Era, str | None]:
    """The era a request belongs to, and the protocol version it speaks (None: initialize decides)."""
    headers = call.request.headers
    version = headers.get(PROTOCOL_VERSION_HEADER)
    has_session = SESSION_HEADER in headers
    if message.method == "initialize" and not has_session and version not in MODERN_VERSIONS:
        return Era.HANDSHAKE, None
    if has_session or version in HANDSHAKE_VERSIONS:
        if version is not None and version not in HANDSHAKE_VERSIONS:
            raise UnsupportedProtocolVersion(
                "Unsupported protocol version for a session",
                data={"supported": ALL_VERSIONS, "requested": version},
            )
        if not has_session:
            raise MissingSession()
        return Era.HANDSHAKE, version or DEFAULT_HANDSHAKE_VERSION
    if version is None or version in MODERN_VERSIONS or "_meta" in message.params:
        # The modern ladder: headers must agree with the body before the version is judged.
        checked = check_modern_envelope(
            message, version, headers.get(METHOD_HEADER), headers.get(NAME_HEADER)
        )
        return Era.MODERN, checked
    raise UnsupportedProtocolVersion(data={"supported": ALL_VERSIONS, "requested": version})


async def parse(call: Call) -> Request:
    """Call -> Request: the message, its era and version, and the routing headers for the upstream."""
    message = await read_message(call)
    call.message = message  # a refusal from here on answers under the message's id
    for name in _SINGLE_HEADERS:
        single_header(call, name)
    era, version = era_of(call, message)
    call.era = era  # a refusal from here on goes out as that era answers it
    if message.kind is MessageKind.RESPONSE:
        if era is Era.MODERN:
            raise BadRequest(
                "Invalid request: the 2026-07-28 protocol has no server-to-client requests to answer"
            )
    elif message.method not in KNOWN_METHODS[era]:
        raise MethodNotFound(f"Method not found: {str(message.method)[:100]!r}")
    headers: dict[str, str] = {}
    if version is not None:
        headers[PROTOCOL_VERSION_HEADER] = version
    if era is Era.MODERN:
        headers[METHOD_HEADER] = str(message.method)
        mirrored_name = name_header_for(message)
        if mirrored_name is not None:
            headers[NAME_HEADER] = mirrored_name
    call.upstream_headers = headers
    return parsed(call, message, era, version)


async def require_event_stream(call: Call) -> None:
    accept = ",".join(call.request.headers.getall(hdrs.ACCEPT, []))
    if not accepts(accept, "text/event-stream"):
        raise NotAcceptable("Not acceptable: a GET stream needs Accept: text/event-stream")
