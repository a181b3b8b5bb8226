"""Every error a client can see, each mapped once to a JSON-RPC code and an HTTP status.

    ProxyError                          -32603  500  something of ours went wrong (never details)
    ├── BadRequest                      -32600  400  not a request we can take
    │   ├── ParseError                  -32700  400  malformed JSON, invalid UTF-8, duplicate keys
    │   ├── InvalidParams               -32602  400  params of the wrong shape
    │   │   ├── UnknownResource       * -32602  400  a resource the caller's tenant may not see
    │   │   └── UnknownTask           * -32602  400  a task id not issued to the caller (or gone)
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
    ├── TooManyRequests                 -32009  429  (Retry-After)
    ├── SessionStoreUnavailable         -32013  503  the shared session store cannot be reached
    ├── ShuttingDown                    -32014  503  still open when the proxy's stop grace ended
    └── UpstreamError                   -32010  502  the tenant's upstream failed this request
        ├── UpstreamTimeout             -32011  504
        └── UpstreamUnavailable         -32012  503  circuit open: failing fast (Retry-After)

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


class UnknownTask(InvalidParams):
    """A task id the proxy did not issue to this caller, or one its upstream no longer knows: the
    answer is the same for all of them (no probing whose task an id is)."""

    answer = True
    default_message = "Failed to retrieve task: Task not found"


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


class SessionStoreUnavailable(ProxyError):
    code = -32013
    status = 503
    default_message = "Sessions cannot be created right now: the shared session store is unreachable"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"Retry-After": "5"})


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

# Codes the MCP spec gives a meaning whose `data` a client needs (-32002/-32042: earlier versions).
_MCP_SERVER_CODES = frozenset({-32002, -32020, -32021, -32022, -32042})
# -32000..-32019 are implementation-defined: an upstream's own, whose messages may carry internals.
_IMPLEMENTATION_DEFINED = range(-32019, -31999)
_MAX_ERROR_MESSAGE = 500


def sanitize_error(error: Any) -> JsonObject:
    """An upstream JSON-RPC error as the client may see it: internals (stack traces) never pass."""
    if not isinstance(error, dict):
        return {"code": -32603, "message": "Upstream server error"}
    code = error.get("code")
    if not isinstance(code, int) or isinstance(code, bool):
        return {"code": -32603, "message": "Upstream server error"}
    if code == -32603 or code in _IMPLEMENTATION_DEFINED:
        return {"code": code, "message": "Upstream server error"}
    message = error.get("message")
    text = message if isinstance(message, str) else ""
    text = "".join(ch if ch.isprintable() else " " for ch in text[:_MAX_ERROR_MESSAGE])
    clean: JsonObject = {"code": code, "message": text or "Upstream error"}
    if code in _MCP_SERVER_CODES and "data" in error:
        clean["data"] = error["data"]
    return clean
