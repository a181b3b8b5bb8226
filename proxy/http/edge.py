"""The HTTP edge: what every request gets before and after the MCP flow.

The `edge` middleware gives each request an id of the proxy's own (random, so no client can predict
another's and log under it) on every log line and in the answer's X-Request-Id; a client's own
well-formed X-Request-Id is kept beside it as `client_request_id`, never as the id. It turns
anything that escapes into a JSON-RPC error body, never a traceback. `check_origin` is the flows'
first check (DNS rebinding); `error_reply` is how every refusal of a flow is answered.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import hdrs, web

from proxy.flow import Exchange
from proxy.http.keys import CLIENT_REQUEST_ID, REQUEST_ID
from proxy.protocol.errors import BadRequest, Forbidden, ProxyError, http_status
from proxy.protocol.jsonrpc import dumps, error_body
from proxy.upstreams.base import JSON

log = structlog.get_logger("proxy.app")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
NO_STORE = {"Cache-Control": "no-store"}
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # what of a client's id may reach a log line


class RandomIds:
    """Request ids of 64 random bits from the operating system's generator, as secrets.token_hex(8)
    gives them, drawn 256 ids at a time: one system call per 256 requests instead of one each. A
    forked child draws its own (it must never repeat its parent's ids)."""

    __slots__ = ("_at", "_pool")
    BATCH = 256

    def __init__(self) -> None:
        self._pool, self._at = "", 0
        os.register_at_fork(after_in_child=self._drop)

    def __call__(self) -> str:
        at = self._at
        if at >= len(self._pool):
            self._pool, at = os.urandom(8 * self.BATCH).hex(), 0
        self._at = at + 16
        return self._pool[at : at + 16]

    def _drop(self) -> None:
        self._pool, self._at = "", 0


new_request_id = RandomIds()


@web.middleware
async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request: a request id on each log line, and whatever goes wrong a JSON-RPC error."""
    # 64 random bits per request: a counter, even behind a random prefix, would let a tenant that
    # saw one id claim the next, another tenant's, in its own requests.
    request_id = new_request_id()
    request[REQUEST_ID] = request_id
    structlog.contextvars.clear_contextvars()
    offered = request.headers.getall("X-Request-Id", [])
    if len(offered) == 1 and _CLIENT_REQUEST_ID.fullmatch(offered[0]):
        request[CLIENT_REQUEST_ID] = offered[0]
        structlog.contextvars.bind_contextvars(request_id=request_id, client_request_id=offered[0])
    else:
        request[CLIENT_REQUEST_ID] = None
        structlog.contextvars.bind_contextvars(request_id=request_id)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        body = error_body(None, -32600, exc.reason)
        return web.Response(status=exc.status, body=dumps(body), content_type=JSON)
    except ProxyError as exc:
        return web.Response(
            status=exc.status, body=dumps(exc.to_jsonrpc(None)), content_type=JSON, headers=exc.headers
        )
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled_error", path=request.path)
        body = error_body(None, -32603, "Internal proxy error")
        return web.Response(status=500, body=dumps(body), content_type=JSON)


async def stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    if REQUEST_ID in request:
        response.headers["X-Request-Id"] = request[REQUEST_ID]


def single_header(exchange: Exchange, name: str) -> str | None:
    """A header that must appear at most once (two copies would let two readers disagree)."""
    values = exchange.request.headers.getall(name, [])
    if len(values) > 1:
        raise BadRequest(f"Bad request: the {name} header appears more than once")
    return values[0] if values else None


async def check_origin(exchange: Exchange) -> None:
    """A browser Origin must be allowed (DNS rebinding); requests without one pass."""
    origins = exchange.request.headers.getall(hdrs.ORIGIN, [])
    if len(origins) > 1 or (origins and not exchange.runtime.origins.allows(origins[0])):
        raise Forbidden("Forbidden: Origin not allowed")


def error_reply(exchange: Exchange, error: ProxyError) -> web.Response:
    """The answer to a refused or failed exchange: a JSON-RPC error body, under the error's status
    in the exchange's era (a refusal of a well-formed request is an answer: errors.http_status)."""
    status = http_status(error, exchange.era)
    exchange.refused(status, error.code, denied=error.status in (401, 403))
    request_id = exchange.message.id if exchange.message is not None else None
    response = web.Response(
        status=status,
        body=dumps(error.to_jsonrpc(request_id)),
        content_type=JSON,
        headers={**NO_STORE, **error.headers},
    )
    if error.status in (408, 413) or not exchange.request.content.is_eof():
        response.force_close()  # the rest of the body is unread (refused before it came): close
    return response
