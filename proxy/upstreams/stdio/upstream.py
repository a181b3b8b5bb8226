"""A tenant's stdio upstream, seen by the rest of the proxy as one streamable-HTTP MCP server.

    modern-era request ............ the tenant's shared child (one per tenant, 2026-07-28 on stdio)
    handshake session, per_session  its own child, initialized by the client's own initialize
    handshake session, per_tenant   the tenant's shared handshake child, initialized by the proxy

Every request sent to a child gets a proxy id (and a proxy progress token), so several sessions
can share one child; each answer, progress notification and subscription notification goes back
to the request that caused it. What names no request (a log message: stdio carries no
relatedRequestId) goes to the session that owns the child (per_session), to the one request in
flight while the child has only ever served that request's user, or nowhere (counted): never to
another tenant, never to another user. A child belongs to exactly one tenant.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

from proxy import __version__
from proxy.config import UpstreamConfig
from proxy.protocol.errors import (
    ProxyError,
    TooManyRequests,
    UpstreamError,
    UpstreamTimeout,
)
from proxy.protocol.sse import Comment, Event
from proxy.types import HANDSHAKE_VERSIONS, MODERN_VERSIONS, JsonObject, RequestId
from proxy.upstreams.base import EVENT_STREAM, JSON, UpstreamRequest
from proxy.upstreams.stdio.child import Child, StartFailed

log = structlog.get_logger("proxy.upstreams.stdio")

READY_TIMEOUT_SECONDS: Final = 15.0
MAX_QUEUED_MESSAGES: Final = 1024
MAX_BACKLOG: Final = 256
BACKOFF_START_SECONDS: Final = 0.5
BACKOFF_MAX_SECONDS: Final = 30.0
PROGRESS_TOKEN: Final = "progressToken"  # noqa: S105 - a field name
SUBSCRIPTION_ID: Final = "io.modelcontextprotocol/subscriptionId"
HANDSHAKE_VERSION: Final = "2025-11-25"
_END = object()
_SUBSCRIPTION_METHODS: Final = frozenset({"resources/subscribe", "resources/unsubscribe"})


def _offer(queue: asyncio.Queue[Any], message: Any, final: bool = False) -> None:
    """Queue a message; past the bound, notifications are dropped (a flood is never buffered),
    while an answer and the end of a stream always get through."""
    if final or queue.qsize() < MAX_QUEUED_MESSAGES:
        queue.put_nowait(message)


class NotModern(Exception):
    """A stdio server answered the 2026-07-28 readiness probe with an error, or not at all (None):
    it does not speak that era (upstreams/eras.py judges the answer)."""

    def __init__(self, error: JsonObject | None) -> None:
        super().__init__("not a 2026-07-28 server")
        self.error = error


@dataclass(eq=False)
class Pending:
    """One client request in flight on a child, and the messages that belong to it."""

    proxy_id: int
    original_id: RequestId
    session: VirtualSession | None
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    original_token: Any = None
    principal: str | None = None  # who asked (TenantContext.principal)

    def deliver(self, message: JsonObject) -> None:
        _offer(self.queue, message)

    def finish(self, answer: JsonObject | ProxyError) -> None:
        """The answer (or the proxy's own error, raised to the relay), then the end of the stream."""
        _offer(self.queue, answer, final=True)
        _offer(self.queue, _END, final=True)


@dataclass(eq=False)
class VirtualSession:
    """A handshake-era session as the proxy's transport sees it: an upstream session id."""

    id: str
    connection: Connection
    backlog: deque[JsonObject] = field(default_factory=lambda: deque(maxlen=MAX_BACKLOG))
    stream: asyncio.Queue[Any] | None = None  # the open GET stream, if any
    dedicated: bool = False  # per_session: the child is this session's alone

    def deliver(self, message: JsonObject) -> None:
        if self.stream is not None:
            _offer(self.stream, message)
        else:
            self.backlog.append(message)


class Connection:
    """A child and the requests multiplexed onto it (ids and progress tokens rewritten)."""

    def __init__(self, upstream: StdioUpstream, era: str) -> None:
        self.upstream = upstream
        self.era = era  # "modern" or "handshake": a stdio server serves one era per process
        self.child: Child | None = None
        self.pending: dict[int, Pending] = {}
        self.tokens: dict[str, Pending] = {}
        self.sessions: dict[str, VirtualSession] = {}
        self.initialize_result: JsonObject | None = None
        self.subscribers: dict[str, set[str]] = {}  # shared handshake child: resource URI -> session ids
        self.last_used = time.monotonic()
        self.stopping = False
        self._ids = itertools.count(1)
        # Whom the child has served: a line naming no request may come from any call it ever took
        # (a tool logging in the background after its answer, after a cancel or a timeout), so it
        # can be attributed only while every such call was of one user.
        self._served: str | None = None
        self._served_many = False

    @property
    def alive(self) -> bool:
        return self.child is not None and self.child.alive

    async def start(self) -> None:
        config = self.upstream.config
        assert config.command is not None
        environment = config.child_environment(os.environ)
        self.child = Child(
            self.upstream.tenant, config.command, environment, config.cwd, self._on_message, self._on_exit,
            config.limits,
        )  # fmt: skip
        await self.child.start()

    async def request(
        self, message: JsonObject, session: VirtualSession | None, principal: str | None = None
    ) -> Pending:
        """Send a client request under a proxy id; its answer and notifications arrive on the Pending."""
        if self.child is None:
            raise UpstreamError("The stdio MCP server is not running")
        proxy_id = next(self._ids)
        pending = Pending(proxy_id, message["id"], session, principal=principal)
        if principal is not None:  # (the proxy's own requests, None, are answered by the proxy)
            if self._served is None:
                self._served = principal
            elif principal != self._served:
                self._served_many = True
        outgoing = {**message, "id": proxy_id}
        params = message.get("params")
        meta = params.get("_meta") if isinstance(params, dict) else None
        if isinstance(params, dict) and isinstance(meta, dict) and PROGRESS_TOKEN in meta:
            pending.original_token = meta[PROGRESS_TOKEN]
            token = f"p{proxy_id}"
            self.tokens[token] = pending
            outgoing["params"] = {**params, "_meta": {**meta, PROGRESS_TOKEN: token}}
        self.pending[proxy_id] = pending
        self.last_used = time.monotonic()
        try:
            await self.child.send(outgoing)
        except UpstreamError:
            self._forget(proxy_id)
            raise
        return pending

    def cancel(self, pending: Pending) -> None:
        """The client went away before the answer: tell the child, forget the request."""
        if pending.proxy_id not in self.pending:
            return
        self._forget(pending.proxy_id)
        self._send_soon(
            {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": pending.proxy_id}}
        )

    def cancel_by_client(self, params: Any, session: VirtualSession) -> None:
        """A client's notifications/cancelled names its own request id: it reaches the child under
        that request's proxy id, and only for a request of the same session (never another's)."""
        if not isinstance(params, dict):
            return
        wanted = params.get("requestId")
        for pending in self.pending.values():
            if (
                pending.session is session
                and type(pending.original_id) is type(wanted)
                and pending.original_id == wanted
            ):
                self._forget(pending.proxy_id)
                cancel: JsonObject = {"requestId": pending.proxy_id}
                if isinstance(params.get("reason"), str):
                    cancel["reason"] = params["reason"]
                self._send_soon({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": cancel})
                _offer(pending.queue, _END, final=True)  # a cancelled request gets no answer
                return

    def _send_soon(self, message: JsonObject) -> None:
        if self.child is not None and self.child.alive:
            task = asyncio.ensure_future(self.child.send(message))
            task.add_done_callback(lambda done: done.cancelled() or done.exception())

    def _forget(self, proxy_id: int) -> None:
        pending = self.pending.pop(proxy_id, None)
        if pending is not None:
            self.tokens.pop(f"p{proxy_id}", None)

    def _on_message(self, message: JsonObject) -> None:
        self.last_used = time.monotonic()
        if self.upstream.start_problem is not None or not self.upstream.proven:
            self.upstream.started_fine()
        if "method" not in message:
            self._on_answer(message)
            return
        params = message.get("params")
        if not isinstance(params, dict):
            params = {}
        meta = params.get("_meta")
        if message["method"] == "notifications/progress":
            pending = self.tokens.get(str(params.get(PROGRESS_TOKEN)))
            if pending is not None:
                pending.deliver({**message, "params": {**params, PROGRESS_TOKEN: pending.original_token}})
            return
        if isinstance(meta, dict) and SUBSCRIPTION_ID in meta:
            pending = (
                self.pending.get(meta[SUBSCRIPTION_ID]) if isinstance(meta[SUBSCRIPTION_ID], int) else None
            )
            if pending is not None:
                restored = {**meta, SUBSCRIPTION_ID: pending.original_id}
                pending.deliver({**message, "params": {**params, "_meta": restored}})
            return
        self._unattributed(message)

    def _on_answer(self, message: JsonObject) -> None:
        proxy_id = message.get("id")
        pending = self.pending.get(proxy_id) if isinstance(proxy_id, int) else None
        if pending is None:
            log.warning("stdio_unknown_answer", tenant=self.upstream.tenant)
            return
        self._forget(pending.proxy_id)
        pending.finish({**message, "id": pending.original_id})

    def _unattributed(self, message: JsonObject) -> None:
        """A server request or notification that names no request: its owner, or nobody."""
        owner = next((s for s in self.sessions.values() if s.dedicated), None)
        if owner is not None:  # per_session: everything the child says is its session's
            in_flight = [p for p in self.pending.values() if p.session is owner]
            (in_flight[-1] if in_flight else owner).deliver(message)
            return
        if message["method"].endswith("/list_changed"):
            for session in self.sessions.values():  # a shared child's lists changed for all who share it
                session.deliver(message)
            return
        if message["method"] == "notifications/resources/updated":
            params = message.get("params")
            uri = params.get("uri") if isinstance(params, dict) else None
            for session_id in self.subscribers.get(uri, ()) if isinstance(uri, str) else ():
                subscriber = self.sessions.get(session_id)
                if subscriber is not None:
                    subscriber.deliver(message)  # to the sessions that subscribed to it, no other
            return
        if "id" not in message and len(self.pending) == 1 and not self._served_many:
            # A notification naming no request (a log message, say) while exactly one request is in
            # flight, on a child that has only ever served that request's user: whichever of their
            # calls it came from (this one, or one answered, cancelled or timed out before), it is
            # theirs. Once a second user has been served, no such line can be told apart: dropped.
            only = next(iter(self.pending.values()))
            if only.principal is not None and only.principal == self._served:
                only.deliver(message)
                return
        if "id" in message:
            self._send_soon(
                {
                    "jsonrpc": "2.0",
                    "id": message["id"],
                    "error": {
                        "code": -32601,
                        "message": "This server is shared between sessions (isolation: per_tenant); "
                        "server-to-client requests cannot be routed",
                    },
                }
            )
        self.upstream.unattributed_dropped += 1
        log.debug("stdio_message_dropped", tenant=self.upstream.tenant, method=message["method"][:100])

    def _on_exit(self, child: Child) -> None:
        failure = child.failure()
        if isinstance(failure, StartFailed):
            self.upstream.start_problem = failure.what
        for pending in list(self.pending.values()):
            pending.finish(failure)
        self.pending.clear()
        self.tokens.clear()
        for session in self.sessions.values():
            if session.stream is not None:
                _offer(session.stream, _END, final=True)
        self.upstream.connection_exited(self)

    async def stop(self) -> None:
        self.stopping = True
        if self.child is not None:
            await self.child.stop()
        self.upstream.processes.discard(self)


class StdioResponse:
    """An upstream answer shaped like the HTTP one the transport relays."""

    def __init__(
        self,
        status: int,
        queue: asyncio.Queue[Any] | None = None,
        session_id: str | None = None,
        on_close: Callable[[], None] | None = None,
        read_timeout: float | None = None,
        body: bytes = b"",
    ) -> None:
        self.status = status
        self.content_type = EVENT_STREAM if queue is not None else JSON
        self.session_id = session_id
        self.retry_after: str | None = None  # a child never asks to wait (the proxy caps its processes)
        self._queue = queue
        self._on_close = on_close
        self._read_timeout = read_timeout
        self._body = body

    async def read_json(self) -> bytes:
        return self._body

    async def events(self) -> AsyncIterator[list[Event | Comment]]:
        if self._queue is None:
            return
        while True:
            try:
                items = [await asyncio.wait_for(self._queue.get(), self._read_timeout)]
            except TimeoutError:
                raise UpstreamTimeout() from None
            while not self._queue.empty():  # everything already there goes out together
                items.append(self._queue.get_nowait())
            batch: list[Event | Comment] = []
            for item in items:
                if item is _END:
                    if batch:
                        yield batch
                    return
                if isinstance(item, ProxyError):
                    if batch:
                        yield batch
                    raise item
                batch.append(Event(data=json.dumps(item, ensure_ascii=False, separators=(",", ":"))))
            yield batch

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


def _answered(request_id: Any, result: Any, session_id: str | None = None) -> StdioResponse:
    """An answer the proxy gives itself, shaped like one from the child."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    queue.put_nowait({"jsonrpc": "2.0", "id": request_id, "result": result})
    queue.put_nowait(_END)
    return StdioResponse(200, queue, session_id)


class StdioUpstream:
    """The Upstream protocol over stdio children that belong to one tenant."""

    def __init__(self, tenant: str, config: UpstreamConfig) -> None:
        assert config.command is not None
        self.tenant = tenant
        self.config = config
        self.identity = "stdio:" + json.dumps(list(config.command))
        self.per_session = (config.isolation or "per_session") == "per_session"
        self._shared: dict[str, Connection] = {}
        self._sessions: dict[str, VirtualSession] = {}
        self._starting: dict[str, asyncio.Lock] = {"modern": asyncio.Lock(), "handshake": asyncio.Lock()}
        self._backoff = BACKOFF_START_SECONDS
        self._next_start = 0.0
        self._closed = False
        self.processes: set[Connection] = set()  # running or starting: at most max_processes
        # For /readyz and `check-config --probe`: whether a child of this upstream has ever answered,
        # and how the last one that could not start failed (cleared when one answers).
        self.proven = False
        self.start_problem: str | None = None
        # Messages of its children that named no request and could not be attributed (dropped):
        # read by /metrics (mcp_proxy_unattributed_notifications_dropped_total).
        self.unattributed_dropped = 0

    # --- the Upstream protocol ---------------------------------------------------------------

    async def send(self, request: UpstreamRequest) -> StdioResponse:
        session_id = request.headers.get("Mcp-Session-Id")
        if request.http_method == "DELETE":
            return await self._end_session(session_id)
        if request.http_method == "GET":
            return self._open_stream(session_id)
        message: JsonObject = json.loads(request.body or b"{}")
        version = request.headers.get("MCP-Protocol-Version")
        if session_id is None and version in MODERN_VERSIONS:
            try:
                connection = await self._shared_connection("modern")
            except NotModern as refusal:  # its answer, as an HTTP server would give it
                if refusal.error is None:
                    return StdioResponse(400)
                error = {"jsonrpc": "2.0", "id": message.get("id"), "error": refusal.error}
                return StdioResponse(200, body=json.dumps(error).encode())
            return await self._forward(connection, message, None, request.principal)
        if session_id is None and message.get("method") == "initialize":
            return await self._initialize(message)
        session = self._sessions.get(session_id or "")
        if session is None or not session.connection.alive or version not in HANDSHAKE_VERSIONS | {None}:
            return StdioResponse(404)
        shared_handshake = session.connection.era == "handshake" and not session.dedicated
        if shared_handshake and message.get("method") == "notifications/initialized":
            return StdioResponse(202)  # the proxy initialized the shared child itself
        return await self._forward(session.connection, message, session, request.principal)

    async def close(self) -> None:
        self._closed = True
        connections = {
            id(c): c for c in [*self._shared.values(), *(s.connection for s in self._sessions.values())]
        }
        self._sessions.clear()
        self._shared.clear()
        await asyncio.gather(*(c.stop() for c in connections.values()), return_exceptions=True)

    # --- routing -----------------------------------------------------------------------------

    async def _forward(
        self,
        connection: Connection,
        message: JsonObject,
        session: VirtualSession | None,
        principal: str | None = None,
    ) -> StdioResponse:
        assert connection.child is not None
        method = message.get("method")
        if method == "notifications/cancelled" and "id" not in message:
            # Request ids are the proxy's on the child: a cancel is mapped to the caller's own request.
            # Modern era: closing the request's stream is what cancels it (and does, under its id).
            if session is not None:
                connection.cancel_by_client(message.get("params"), session)
            return StdioResponse(202)
        if "id" not in message or method is None:  # a notification, or an answer to the server
            await connection.child.send(message)
            return StdioResponse(202)
        if session is not None and not session.dedicated and method in _SUBSCRIPTION_METHODS:
            local = self._track_subscription(connection, message, session)
            if local is not None:
                return local
        pending = await connection.request(message, session, principal)
        return self._answer_stream(connection, pending)

    def _track_subscription(
        self, connection: Connection, message: JsonObject, session: VirtualSession
    ) -> StdioResponse | None:
        """On a shared child, the child holds one subscription per URI for all sessions: the first
        subscribe and the last unsubscribe reach it, the proxy answers the others; updates go to
        the sessions that subscribed."""
        params = message.get("params")
        uri = params.get("uri") if isinstance(params, dict) else None
        if not isinstance(uri, str):
            return None  # the child answers what is wrong with it
        subscribers = connection.subscribers.setdefault(uri, set())
        if message["method"] == "resources/subscribe":
            first = not subscribers
            subscribers.add(session.id)
            if first:
                return None  # the child subscribes once, for all
        else:
            subscribers.discard(session.id)
            if not subscribers:
                del connection.subscribers[uri]
                return None  # the last one out: the child unsubscribes
        return _answered(message["id"], {})  # the child is subscribed already, and stays so

    def _answer_stream(
        self, connection: Connection, pending: Pending, session_id: str | None = None
    ) -> StdioResponse:
        return StdioResponse(
            200,
            pending.queue,
            session_id,
            on_close=lambda: connection.cancel(pending),
            read_timeout=self.config.read_timeout_seconds,
        )

    async def _initialize(self, message: JsonObject) -> StdioResponse:
        if self.per_session:
            connection = Connection(self, "handshake")
            await self._start(connection)
            session = VirtualSession(secrets.token_urlsafe(18), connection, dedicated=True)
            connection.sessions[session.id] = session
            self._sessions[session.id] = session
            pending = await connection.request(message, session)
            return self._answer_stream(connection, pending, session.id)
        connection = await self._shared_connection("handshake")
        session = VirtualSession(secrets.token_urlsafe(18), connection)
        connection.sessions[session.id] = session
        self._sessions[session.id] = session
        return _answered(message.get("id"), connection.initialize_result, session.id)

    def _open_stream(self, session_id: str | None) -> StdioResponse:
        session = self._sessions.get(session_id or "")
        if session is None or not session.connection.alive:
            return StdioResponse(404)
        if session.stream is not None:
            return StdioResponse(409)
        stream: asyncio.Queue[Any] = asyncio.Queue(MAX_QUEUED_MESSAGES)
        while session.backlog:
            stream.put_nowait(session.backlog.popleft())
        session.stream = stream

        def closed() -> None:
            if session.stream is stream:
                session.stream = None

        return StdioResponse(200, stream, on_close=closed)

    async def _end_session(self, session_id: str | None) -> StdioResponse:
        session = self._sessions.pop(session_id or "", None)
        if session is None:
            return StdioResponse(404)
        session.connection.sessions.pop(session.id, None)
        subscriptions = session.connection.subscribers
        for uri in list(subscriptions):
            subscriptions[uri].discard(session.id)
            if not subscriptions[uri]:
                del subscriptions[uri]  # (the child stays subscribed; its updates go to nobody)
        if session.dedicated:
            await session.connection.stop()
        return StdioResponse(200)

    # --- supervision -------------------------------------------------------------------------

    async def _shared_connection(self, era: str) -> Connection:
        connection = self._shared.get(era)
        if connection is not None and connection.alive:
            return connection
        async with self._starting[era]:
            connection = self._shared.get(era)
            if connection is not None and connection.alive:
                return connection
            connection = Connection(self, era)
            await self._start(connection)
            await self._ready(connection)
            self._shared[era] = connection
            return connection

    async def _start(self, connection: Connection) -> None:
        if self._closed:
            raise UpstreamError("The proxy is shutting down")
        if len(self.processes) >= self.config.max_processes:
            raise self._too_many()  # nothing is started: the tenant's processes are bounded
        self.processes.add(connection)
        try:
            wait = self._next_start - time.monotonic()
            if wait > 0:  # restarting after a crash: back off, so a crash loop cannot spin
                await asyncio.sleep(wait)
            await connection.start()
        except StartFailed as failure:
            self.processes.discard(connection)
            self.start_problem = failure.what
            raise
        except BaseException:
            self.processes.discard(connection)
            raise

    def _too_many(self) -> TooManyRequests:
        """Refused: Retry-After is when the first idle process will have been stopped."""
        now, idle_stop = time.monotonic(), self.config.idle_stop_seconds
        waits = [c.last_used + idle_stop - now for c in self.processes if not c.pending]
        return TooManyRequests(
            "Too many requests: this tenant runs as many MCP server processes as it may",
            data={"limit": "processes"},
            headers={"Retry-After": str(max(1, math.ceil(min(waits, default=idle_stop))))},
        )

    def started_fine(self) -> None:
        self.proven = True
        self.start_problem = None

    async def probe(self) -> str | None:
        """Start a child of its own, complete the MCP handshake, stop it: None when all went well,
        else what went wrong (for /readyz and `check-config --probe`). A server that refuses the
        handshake-era initialize is tried with the modern server/discover."""
        problem: str | None = None
        for era in ("handshake", "modern"):
            connection = Connection(self, era)
            try:
                await connection.start()
                await self._ready(connection)
                return None
            except StartFailed as failure:
                self.start_problem = failure.what
                return failure.explained()
            except UpstreamTimeout as timeout:
                return timeout.message
            except UpstreamError as error:
                problem = error.message  # it answered, but not the initialize: try the modern era
            finally:
                await connection.stop()
        return problem

    async def _ready(self, connection: Connection) -> None:
        """The readiness handshake: discover (modern) or initialize (handshake), with a timeout."""
        meta = {
            "io.modelcontextprotocol/protocolVersion": next(iter(MODERN_VERSIONS)),
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "mcp-tenant-proxy", "version": __version__},
        }
        if connection.era == "modern":
            probe: JsonObject = {
                "jsonrpc": "2.0",
                "id": "ready",
                "method": "server/discover",
                "params": {"_meta": meta},
            }
        else:
            probe = {
                "jsonrpc": "2.0",
                "id": "ready",
                "method": "initialize",
                "params": {
                    "protocolVersion": HANDSHAKE_VERSION,
                    "capabilities": {},  # no back channel: a shared child cannot route one
                    "clientInfo": {"name": "mcp-tenant-proxy", "version": __version__},
                },
            }
        pending = await connection.request(probe, None)
        try:
            answer = await asyncio.wait_for(pending.queue.get(), READY_TIMEOUT_SECONDS)
        except TimeoutError:
            await connection.stop()
            if connection.era == "modern":  # the spec's probe rule: no answer is a handshake server
                raise NotModern(None) from None
            raise UpstreamTimeout(
                f"The stdio MCP server did not answer the MCP handshake within {READY_TIMEOUT_SECONDS:g} s"
            ) from None
        if isinstance(answer, ProxyError):  # it exited first: how, and what to check
            await connection.stop()
            raise answer
        if not isinstance(answer, dict) or not isinstance(answer.get("result"), dict):
            await connection.stop()
            error = answer.get("error") if isinstance(answer, dict) else None
            if connection.era == "modern" and isinstance(error, dict):
                raise NotModern(error)  # it answered: it speaks the other era (upstreams/eras.py)
            raise UpstreamError("The stdio MCP server failed its readiness handshake")
        if connection.era == "handshake":
            connection.initialize_result = answer["result"]
            assert connection.child is not None
            await connection.child.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        self._backoff = BACKOFF_START_SECONDS

    def connection_exited(self, connection: Connection) -> None:
        """A child exited: its requests already got errors; its sessions are gone (404 on next use)."""
        self.processes.discard(connection)
        for era, shared in list(self._shared.items()):
            if shared is connection:
                del self._shared[era]
        for session_id in list(connection.sessions):
            self._sessions.pop(session_id, None)
        if not connection.stopping:  # a crash, not a stop: the next start waits, longer each time
            if connection.child is not None and connection.child.spoke:  # (else its start failure is logged)
                log.warning("stdio_crashed", tenant=self.tenant, restart_in_seconds=self._backoff)
            self._next_start = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, BACKOFF_MAX_SECONDS)

    async def sweep(self) -> None:
        """Stop processes nobody has sent a request for `idle_stop_seconds`: a shared one without
        sessions (the next use starts it again), and a session's own whatever the session's idle
        timeout (the session ends with it: its next request gets 404 and the client starts anew)."""
        now = time.monotonic()
        for connection in list(self.processes):
            if connection.pending or now - connection.last_used <= self.config.idle_stop_seconds:
                continue
            own = any(session.dedicated for session in connection.sessions.values())
            if connection.sessions and not own:
                continue  # the tenant's shared handshake process, while sessions use it
            log.info("stdio_idle_stop", tenant=self.tenant, per_session=own)
            await connection.stop()
