"""What an upstream is to the rest of the proxy: one `send` of one HTTP exchange of MCP.

    Upstream.send(UpstreamRequest) -> UpstreamResponse      (httpx's transport idea)
        HttpUpstream   (upstreams/http.py)   the tenant's streamable-HTTP server
        StdioUpstream  (upstreams/stdio/)    local processes of the tenant, shaped like one
        MockUpstream   (below)               scripted answers, for unit tests without a server

`incoming(response)` reads any answer, JSON or SSE, as the messages it carries, batch by batch as
they arrive: the relay to clients and the proxy's own calls (catalog listing, handshakes) share it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.protocol.errors import ProxyError, UpstreamError
from proxy.protocol.jsonrpc import loads_upstream
from proxy.protocol.sse import Comment, Event
from proxy.types import JsonObject, RequestId

JSON = "application/json"
EVENT_STREAM = "text/event-stream"


@dataclass(slots=True)
class UpstreamRequest:
    http_method: str  # POST, GET or DELETE
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    # Who asks (TenantContext.principal): a shared stdio child attributes what it says by it; it is
    # never sent to an HTTP upstream.
    principal: str | None = None


class UpstreamResponse(Protocol):
    status: int
    content_type: str
    session_id: str | None
    retry_after: str | None  # an HTTP upstream's Retry-After header, as it came

    async def read_json(self) -> bytes: ...
    def events(self) -> AsyncIterator[list[Event | Comment]]: ...  # what arrived together
    def close(self) -> None: ...


class Upstream(Protocol):
    tenant: str
    identity: str  # what the cache keys and metrics call this upstream (no credentials)

    async def send(self, request: UpstreamRequest) -> UpstreamResponse: ...
    async def sweep(self) -> None: ...  # periodic housekeeping (idle processes, ...)
    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Incoming:
    """One item of an upstream answer: a message, a keep-alive, or an event that carries only an
    id or a retry (a priming event)."""

    message: JsonObject | None
    event_id: str = ""
    retry: int | None = None
    keepalive: bool = False


KEEPALIVE = Incoming(None, keepalive=True)


def parse_upstream(raw: bytes | str) -> JsonObject:
    """One upstream message; anything but a JSON object is the upstream's fault."""
    try:
        message = loads_upstream(raw)
    except ProxyError:
        raise UpstreamError("The upstream MCP server sent a malformed message") from None
    if not isinstance(message, dict):
        raise UpstreamError("The upstream MCP server sent a malformed message")
    return message


async def incoming(
    response: UpstreamResponse, waited: Callable[[float], None] | None = None
) -> AsyncIterator[list[Incoming]]:
    """The messages of an upstream answer, in the batches they arrived in; `waited` is told how long
    each wait for the upstream took (its time, not the proxy's)."""
    loop = asyncio.get_running_loop()
    if response.content_type != EVENT_STREAM:
        started = loop.time()
        try:
            raw = await response.read_json()
        finally:
            if waited is not None:
                waited(loop.time() - started)
        yield [Incoming(parse_upstream(raw))]
        return
    events = response.events().__aiter__()
    while True:
        started = loop.time()
        try:
            batch = await events.__anext__()
        except StopAsyncIteration:
            return
        finally:
            if waited is not None:
                waited(loop.time() - started)
        items: list[Incoming] = []
        for item in batch:
            if isinstance(item, Comment):
                items.append(KEEPALIVE)
            elif not item.data:
                items.append(Incoming(None, item.id, item.retry))
            else:
                try:
                    items.append(Incoming(parse_upstream(item.data), item.id, item.retry))
                except UpstreamError:
                    if items:  # what was good before a bad event still goes out, and first
                        yield items
                    raise
        yield items


def same_id(a: Any, b: RequestId | None) -> bool:
    """JSON-RPC ids match: same type and value (1 and "1" are different requests)."""
    return b is not None and type(a) is type(b) and a == b


async def answer_to(response: UpstreamResponse, request_id: RequestId | None) -> JsonObject | None:
    """The answer to `request_id` in an upstream answer (JSON or SSE), or None when it has none."""
    async for batch in incoming(response):
        for item in batch:
            message = item.message
            if message is not None and "method" not in message and same_id(message.get("id"), request_id):
                return message
    return None


# --- MockUpstream: an upstream for unit tests, answering from a script -----------------------------


class MockResponse:
    """A scripted answer: a JSON body or a list of SSE events."""

    def __init__(
        self,
        status: int = 200,
        body: Any = None,
        events: list[Any] | None = None,
        session_id: str | None = None,
        retry_after: str | None = None,
    ) -> None:
        self.status = status
        self.content_type = EVENT_STREAM if events is not None else JSON
        self.session_id = session_id
        self.retry_after = retry_after
        self._body = body
        self._events = events or []
        self.closed = False

    async def read_json(self) -> bytes:
        return json.dumps(self._body).encode()

    async def events(self) -> AsyncIterator[list[Event | Comment]]:
        for item in self._events:
            yield [item if isinstance(item, Event | Comment) else Event(data=json.dumps(item))]

    def close(self) -> None:
        self.closed = True


class MockUpstream:
    """An Upstream whose answers a test scripts: `handler(request) -> MockResponse`, or a JSON-RPC
    result per method. Every request it got is kept in `requests`."""

    def __init__(
        self,
        handler: Callable[[UpstreamRequest], MockResponse] | None = None,
        results: dict[str, Any] | None = None,
        tenant: str = "acme",
    ) -> None:
        self.tenant = tenant
        self.identity = f"mock:{tenant}"
        self.requests: list[UpstreamRequest] = []
        self._handler = handler
        self._results = results or {}

    async def send(self, request: UpstreamRequest) -> MockResponse:
        self.requests.append(request)
        if self._handler is not None:
            return self._handler(request)
        message = json.loads(request.body or b"{}")
        if "id" not in message or "method" not in message:
            return MockResponse(202)
        result = self._results.get(message["method"], {})
        return MockResponse(body={"jsonrpc": "2.0", "id": message["id"], "result": result})

    def bodies(self) -> list[JsonObject]:
        """The JSON bodies of the requests sent so far."""
        return [json.loads(r.body) for r in self.requests if r.body]

    async def sweep(self) -> None:
        """Nothing to tidy."""

    async def close(self) -> None:
        """Nothing to close."""
