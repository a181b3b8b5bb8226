"""Every error a client can see, each mapped once to a JSON-RPC code and an HTTP status.

    ProxyError                          -32603  500  something of ours went wrong (never details)
    ├── BadRequest                      -32600  400  not a request we can take
    │   ├── ParseError                  -32700  400  malformed JSON, invalid UTF-8, duplicate keys
    │   ├── InvalidParams               -32602  400  params of the wrong shape
    │   │   ├── UnknownResource       * -32602  400  a resource the caller's tenant may not see
    │   │   ├── UnknownTask           * -32602  400  a task id not issued to the caller (or gone)
    │   │   └── DeclaredTooLarge      * -32602  400  capabilities/clientInfo beyond what the bridge keeps
    │   ├── HeaderMismatch              -32020  400  Mcp-Method, Mcp-Name, Mcp-Param-*, version
    │   ├── UnsupportedProtocolVersion  -32022  400  data.supported lists what we speak
    │   ├── MissingSession              -32600  400  handshake-era request without Mcp-Session-Id
    │   ├── RequestHeadersTooLarge      -32600  431
    │   ├── BodyTooLarge                -32600  413
    │   ├── RequestTimeout              -32600  408  the body did not arrive in time
    │   ├── UnsupportedMediaType        -32600  415
    │   └── NotAcceptable               -32600  406
    ├── MethodNotAllowed                -32600  405  (Allow header)
    ├── MethodNotFound                * -32601  404  a method the proxy never forwards
    ├── Unauthenticated                 -32001  401  (WWW-Authenticate: Bearer resource_metadata=...)
    ├── Forbidden                       -32003  403  tenant not configured, Origin not allowed
    │   ├── InsufficientScope           -32003  403  (WWW-Authenticate: Bearer error="insufficient_scope")
    │   └── PolicyDenied              * -32005  403  a policy rule refused the request (data.rule)
    ├── SessionNotFound                 -32004  404  unknown, expired or foreign session: all look alike
    ├── Conflict                        -32600  409  a second GET stream for one session
    ├── TooManyRequests                 -32009  429  (Retry-After); also an upstream's 429 that said when
    ├── StateStoreUnavailable           -32013  503  the shared state store cannot be reached
    │   └── SessionStoreUnavailable     -32013  503  ... so no session can be recorded
    ├── ShuttingDown                    -32014  503  still open when the proxy's stop grace ended
    └── UpstreamError                   -32010  502  the tenant's upstream failed this request
        ├── UpstreamTimeout             -32011  504
        └── UpstreamUnavailable         -32012  503  circuit open: failing fast (Retry-After); also an
                                                     upstream's 503 that said when (Retry-After)

* An answer, not a transport failure: the refusal of a well-formed, authenticated request is the
JSON-RPC error a server would answer with. In the handshake era it goes out as HTTP 200 (clients
such as the TypeScript SDK take any other status for a broken transport); in 2026-07-28 its status
is the one that revision's table gives its code (`http_status`: 400, 404 for -32601, else 200).
Every other error keeps its status in both eras: the transport prescribes those.

Codes of our own are in the implementation-defined range -32000..-32019 (-32020..-32099 belong
to the MCP spec). Messages are fixed strings or name only what the client itself sent (a header
name, an argument name, a rule); never upstream output, tokens, or another tenant's identifiers.
"""

from __future__ import annotations

import datetime
import email.utils
import math
import time
from collections.abc import Callable
from typing import Any, ClassVar

from proxy.types import Era, JsonObject, RequestId


class ProxyError(Exception):
    code: ClassVar[int] = -32603
    status: int = 500
    default_message: ClassVar[str] = "Internal proxy error"
    answer: ClassVar[bool] = False  # a JSON-RPC refusal of a well-formed request (* in the tree)

    def __init__(
        self,
        message: str | None = None,
        *,
        data: Any = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.data = data
        self.headers = headers or {}
        if status is not None:
            self.status = status
        super().__init__(self.message)

    def to_jsonrpc(self, request_id: RequestId | None) -> JsonObject:
        error: JsonObject = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return {"jsonrpc": "2.0", "id": request_id, "error": error}


class BadRequest(ProxyError):
    code = -32600
    status = 400
    default_message = "Invalid request"


class ParseError(BadRequest):
    code = -32700
    default_message = "Parse error: the body is not valid JSON"


class InvalidParams(BadRequest):
    code = -32602
    default_message = "Invalid params"


class UnknownResource(InvalidParams):
    """Exactly what an upstream says of a resource it does not have: no existence probing."""

    answer = True

    @classmethod
    def named(cls, uri: Any) -> UnknownResource:
        """The SDK's answer for a resource it does not have (SEP-2164: `data.uri`), message and data
        bounded as an upstream's are, so the two cannot be told apart."""
        text = f"Unknown resource: {uri}"[:_MAX_ERROR_MESSAGE]
        return cls("".join(ch if ch.isprintable() else " " for ch in text), data=resource_error_data(uri))


class UnknownTask(InvalidParams):
    """A task id the proxy did not issue to this caller, or one its upstream no longer knows: the
    answer is the same for all of them (no probing whose task an id is)."""

    answer = True
    default_message = "Failed to retrieve task: Task not found"


class DeclaredTooLarge(InvalidParams):
    """A client's capabilities and clientInfo come to more than the bridge keeps of them
    (bridge/declared.py): a well-formed request the proxy will not carry."""

    answer = True


class HeaderMismatch(BadRequest):
    code = -32020
    default_message = "A request header does not match the request body"


class UnsupportedProtocolVersion(BadRequest):
    code = -32022
    default_message = "Unsupported protocol version"


class MissingSession(BadRequest):
    default_message = "Bad Request: Mcp-Session-Id header is required for this request"


class RequestHeadersTooLarge(BadRequest):
    status = 431
    default_message = "Request header fields too large"


class BodyTooLarge(BadRequest):
    status = 413
    default_message = "Request body too large"


class RequestTimeout(BadRequest):
    status = 408
    default_message = "Request timeout: the request body did not arrive in time"


class UnsupportedMediaType(BadRequest):
    status = 415
    default_message = "Content-Type must be application/json"


class NotAcceptable(BadRequest):
    status = 406
    default_message = "Accept must list application/json and text/event-stream"


class MethodNotAllowed(ProxyError):
    code = -32600
    status = 405
    default_message = "Method not allowed"


class MethodNotFound(ProxyError):
    code = -32601
    status = 404
    default_message = "Method not found"
    answer = True


class Unauthenticated(ProxyError):
    code = -32001
    status = 401
    default_message = "Unauthorized: a valid bearer token is required"


class Forbidden(ProxyError):
    code = -32003
    status = 403
    default_message = "Forbidden"


class InsufficientScope(Forbidden):
    default_message = "Forbidden: the token lacks a required scope"


class PolicyDenied(Forbidden):
    code = -32005
    default_message = "Denied by policy"
    answer = True


class SessionNotFound(ProxyError):
    code = -32004
    status = 404
    default_message = "Session not found"


class Conflict(ProxyError):
    code = -32600
    status = 409
    default_message = "Conflict"


class TooManyRequests(ProxyError):
    code = -32009
    status = 429
    default_message = "Too many requests"


class StateStoreUnavailable(ProxyError):
    code = -32013
    status = 503
    default_message = "This cannot be done right now: the shared state store is unreachable"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"Retry-After": "5"})


class SessionStoreUnavailable(StateStoreUnavailable):
    default_message = "Sessions cannot be created right now: the shared session store is unreachable"


class ShuttingDown(ProxyError):
    """A request still in flight when the stop's grace period ended (ops/drain.py)."""

    code = -32014
    status = 503
    default_message = (
        "Service unavailable: the proxy is shutting down and this request did not finish in its grace period"
    )

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class UpstreamError(ProxyError):
    code = -32010
    status = 502
    default_message = "The upstream MCP server failed to answer this request"


class UpstreamTimeout(UpstreamError):
    code = -32011
    status = 504
    default_message = "The upstream MCP server did not answer in time"


class UpstreamUnavailable(UpstreamError):
    code = -32012
    status = 503
    default_message = "The upstream MCP server is unavailable"


# The 2026-07-28 Streamable HTTP status of a JSON-RPC error code (as the SDKs map them); others: 200.
MODERN_STATUS: dict[int, int] = {
    -32700: 400, -32600: 400, -32602: 400, -32020: 400, -32021: 400, -32022: 400, -32601: 404,
}  # fmt: skip


def http_status(error: ProxyError, era: Era | None) -> int:
    """The HTTP status an error goes out with in a protocol era (None: not known yet)."""
    if not error.answer or era is None:
        return error.status
    if era is Era.HANDSHAKE:
        return 200
    return MODERN_STATUS.get(error.code, 200)


# --- what a client may see of an upstream's errors -----------------------------------------------

# Codes the MCP spec gives a meaning whose `data` a client needs, passed as they are.
_MCP_SERVER_CODES = frozenset({-32020, -32021, -32022, -32042})
# Resource not found: -32602 since 2026-07-28 (SEP-2164), -32002 before; `data.uri` names the resource.
_RESOURCE_NOT_FOUND = frozenset({-32602, -32002})
# -32000..-32019 are implementation-defined: an upstream's own, whose messages may carry internals.
_IMPLEMENTATION_DEFINED = range(-32019, -31999)
_MAX_ERROR_MESSAGE = 500
MAX_ERROR_URI = 2048


def resource_error_data(uri: Any) -> JsonObject | None:
    """`{"uri": uri}` for an unknown resource's error, when `uri` is one a client may be shown as
    it is: a string with a scheme, bounded, printable and without whitespace. The proxy's own answer
    for a hidden resource uses it too, so that answer and an upstream's stay alike."""
    if not isinstance(uri, str) or not 0 < len(uri) <= MAX_ERROR_URI or ":" not in uri:
        return None
    if any(not ch.isprintable() or ch.isspace() for ch in uri):
        return None
    return {"uri": uri}


def sanitize_error(error: Any, hidden: Callable[[str], bool]) -> JsonObject:
    """An upstream JSON-RPC error as the client may see it: internals (stack traces) never pass.

    `hidden(text)` says whether a text names a resource the caller may not see (another tenant's
    URI): a message saying so is replaced, a `data.uri` naming one is dropped."""
    if not isinstance(error, dict):
        return {"code": -32603, "message": "Upstream server error"}
    code = error.get("code")
    if not isinstance(code, int) or isinstance(code, bool):
        return {"code": -32603, "message": "Upstream server error"}
    data = error.get("data")
    kept = resource_error_data(data.get("uri")) if isinstance(data, dict) else None
    if kept is not None and (code not in _RESOURCE_NOT_FOUND or hidden(kept["uri"])):
        kept = None
    if code == -32603 or code in _IMPLEMENTATION_DEFINED:
        clean: JsonObject = {"code": code, "message": "Upstream server error"}
    else:
        message = error.get("message")
        text = message if isinstance(message, str) else ""
        text = "".join(ch if ch.isprintable() else " " for ch in text[:_MAX_ERROR_MESSAGE])
        clean = {"code": code, "message": text if text and not hidden(text) else "Upstream error"}
    if code in _MCP_SERVER_CODES and "data" in error:
        clean["data"] = data
    elif kept is not None:
        clean["data"] = kept
    return clean


# --- an upstream that asked to be left alone for a while ------------------------------------------

MAX_RETRY_AFTER_SECONDS = 3600  # an upstream asking for longer is waited for this long at most


def retry_after_seconds(value: str | None, now: float | None = None) -> int | None:
    """The seconds a `Retry-After` value asks for (delay-seconds or an HTTP date), at most
    MAX_RETRY_AFTER_SECONDS; None for anything else (absent, negative, fractional, not a date)."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return min(MAX_RETRY_AFTER_SECONDS, int(text)) if len(text) <= 5 else MAX_RETRY_AFTER_SECONDS
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None or when.utcoffset() != datetime.timedelta(0):
        return None  # an HTTP date is always GMT; a local time is a guess
    now = time.time() if now is None else now
    return min(MAX_RETRY_AFTER_SECONDS, max(0, math.ceil(when.timestamp() - now)))


def upstream_asked_to_wait(status: int, retry_after: str | None) -> ProxyError | None:
    """The proxy's answer to an upstream's 429 or 503 that said how long to wait: the same status
    and a Retry-After of its own, the wait in `data.retryAfterSeconds`. None for any other answer
    (one without a usable Retry-After is relayed as before)."""
    if status not in (429, 503):
        return None
    seconds = retry_after_seconds(retry_after)
    if seconds is None:
        return None
    data = {"limit": "upstream", "retryAfterSeconds": seconds}
    headers = {"Retry-After": str(seconds)}
    if status == 429:
        message = f"Too many requests: the upstream MCP server asked to wait {seconds} s before retrying"
        return TooManyRequests(message, data=data, headers=headers)
    message = f"The upstream MCP server is unavailable and asked to wait {seconds} s before retrying"
    return UpstreamUnavailable(message, data=data, headers=headers)
