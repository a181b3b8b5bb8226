"""Handshake-era sessions: proxy-issued ids bound to (tenant, principal), per-session state only.

The client only ever sees the proxy's id (>= 192 random bits); the upstream's session id stays in
here. A lookup succeeds only for the same tenant and principal (issuer and subject) that created
the session; any other
caller gets exactly the answer an id that never existed gets (404).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from proxy.protocol.errors import SessionNotFound, TooManyRequests
from proxy.protocol.jsonrpc import Message
from proxy.types import RequestId, TenantContext

MAX_EVENT_IDS = 1024
MAX_PENDING_SERVER_REQUESTS = 256
MAX_RESUMABLE_STREAMS = 32


@dataclass(eq=False, slots=True)
class PostStream:
    """A request's SSE stream that carried event ids, so its client may resume it (SEP-1699)."""

    request: Message
    answered_at: int | None = None  # the number of the proxy event id that carried the answer


@dataclass(eq=False)
class Session:
    id: str
    tenant: str
    subject: str  # the principal: issuer and subject (TenantContext.principal)
    protocol_version: str
    upstream_session_id: str | None = None
    last_seen: float = field(default_factory=time.monotonic)
    created: float = field(default_factory=time.time)  # wall-clock (0.0: not known)
    closed: bool = False
    # SSE event ids the proxy issued on this session -> the upstream's event id and the stream it
    # belongs to (the id of the request whose POST stream it was, or None: the GET stream).
    event_ids: OrderedDict[str, tuple[str, RequestId | None]] = field(default_factory=OrderedDict)
    # The latest requests whose POST streams carried event ids: what a resumption replays is theirs.
    post_streams: OrderedDict[RequestId, PostStream] = field(default_factory=OrderedDict)
    next_event: int = 0
    # Ids of server-to-client requests relayed to this session and not answered yet.
    pending_server_requests: OrderedDict[RequestId, None] = field(default_factory=OrderedDict)
    # Client requests forwarded upstream and not answered yet: an answer replayed on a resumed GET
    # stream (the POST stream was lost) is delivered as the answer to that request.
    forwarded: OrderedDict[RequestId, Message] = field(default_factory=OrderedDict)
    # Those of them the client cancelled (notifications/cancelled): how they end is its doing.
    cancelled: set[RequestId] = field(default_factory=set)
    # Server-to-client requests relayed or answered on this session so far: an exchange during which
    # this changes may have been shaped by the user's answers, and its result is not cached.
    server_requests: int = 0
    get_stream_open: bool = False
    busy: int = 0  # requests in flight: a session answering one is never idle
    ended: asyncio.Event | None = None  # set when the session is removed: its GET stream ends too

    @classmethod
    def issue(cls, ctx: TenantContext, protocol_version: str, upstream_session_id: str | None) -> Session:
        """A new session of the caller's, under a fresh proxy id (192 random bits)."""
        return cls(
            id=secrets.token_urlsafe(24),
            tenant=ctx.tenant,
            subject=ctx.principal,
            protocol_version=protocol_version,
            upstream_session_id=upstream_session_id,
        )

    def idle_for(self, now: float) -> float:
        """Seconds since the session last did anything; 0 while it is busy or streaming."""
        if self.busy or self.get_stream_open:
            return 0.0
        return now - self.last_seen

    @functools.cached_property
    def audit_id(self) -> str:
        """What logs may show of the session: a hash, never the id that grants access."""
        return hashlib.sha256(self.id.encode()).hexdigest()[:16]

    def issue_event_id(self, upstream_event_id: str, stream: Message | None = None) -> str | None:
        """A proxy event id standing for an upstream one of `stream` (the request whose POST stream
        it is on, or None: the GET stream); None when the upstream gave none."""
        if not upstream_event_id:
            return None
        self.next_event += 1
        proxy_id = str(self.next_event)
        self.event_ids[proxy_id] = (upstream_event_id, stream.id if stream is not None else None)
        if len(self.event_ids) > MAX_EVENT_IDS:
            self.event_ids.popitem(last=False)
        if stream is not None and stream.id is not None:
            if stream.id not in self.post_streams:
                self.post_streams[stream.id] = PostStream(stream.summary())  # (id, method, name only)
                if len(self.post_streams) > MAX_RESUMABLE_STREAMS:
                    self.post_streams.popitem(last=False)
            self.post_streams.move_to_end(stream.id)
        return proxy_id

    def upstream_event_id(self, proxy_event_id: str) -> str | None:
        origin = self.event_ids.get(proxy_event_id)
        return origin[0] if origin is not None else None

    def post_stream_of(self, proxy_event_id: str) -> PostStream | None:
        """The POST stream an event id of this session was issued on (None: the GET stream's, an id
        this session never issued, or a stream too old to be remembered)."""
        origin = self.event_ids.get(proxy_event_id)
        return self.post_streams.get(origin[1]) if origin is not None and origin[1] is not None else None

    def expect_answer(self, request_id: RequestId) -> None:
        self.server_requests += 1
        self.pending_server_requests[request_id] = None
        if len(self.pending_server_requests) > MAX_PENDING_SERVER_REQUESTS:
            self.pending_server_requests.popitem(last=False)

    def take_answer(self, request_id: RequestId) -> bool:
        """True (and forgotten) when request_id is a server request this session still owes an answer."""
        self.server_requests += 1  # (also one another replica relayed)
        return self.pending_server_requests.pop(request_id, False) is None

    def forward(self, request: Message) -> None:
        if request.id is not None:
            self.forwarded[request.id] = request.summary()  # id, method and name only
            if len(self.forwarded) > MAX_PENDING_SERVER_REQUESTS:
                self.forwarded.popitem(last=False)

    def answered(self, request_id: RequestId | None) -> None:
        if request_id is not None:
            self.forwarded.pop(request_id, None)

    def cancel(self, request_id: object) -> None:
        """The client cancelled one of its requests in flight (any other id is ignored)."""
        if isinstance(request_id, str | int) and not isinstance(request_id, bool):
            request = self.forwarded.get(request_id)
            if request is not None and type(request.id) is type(request_id):
                self.cancelled.add(request_id)

    def cancelled_by_client(self, request_id: RequestId | None) -> bool:
        return request_id is not None and request_id in self.cancelled


class LocalViews:
    """The Session objects this process holds, by id, with a count per tenant. The in-process
    registry keeps every session here; the Redis one keeps its replica's views of shared sessions
    (what belongs to one replica: an open GET stream, event ids, requests in flight)."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._per_tenant: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def count(self, tenant: str) -> int:
        return self._per_tenant.get(tenant, 0)

    def keep(self, session: Session) -> None:
        self._sessions[session.id] = session
        self._per_tenant[session.tenant] = self.count(session.tenant) + 1

    def held(self, session_id: str) -> Session | None:
        """The view of a session this process holds, whoever's it is (the admin endpoints' listing)."""
        return self._sessions.get(session_id)

    def find(self, session_id: str, ctx: TenantContext) -> Session | None:
        """The caller's own live view, compared in constant time; anyone else's is None."""
        session = self._sessions.get(session_id)
        if (
            session is None
            or session.closed
            or not secrets.compare_digest(session.tenant, ctx.tenant)
            or not secrets.compare_digest(session.subject.encode(), ctx.principal.encode())
        ):
            return None
        return session

    def forget(self, session: Session) -> None:
        for gone in (session, self._sessions.get(session.id)):
            if gone is not None and gone.ended is not None:
                gone.ended.set()  # an open GET stream of the session ends now (DELETE, reload, expiry)
        if self._sessions.pop(session.id, None) is not None:
            session.closed = True
            remaining = self.count(session.tenant) - 1
            if remaining > 0:
                self._per_tenant[session.tenant] = remaining
            else:
                self._per_tenant.pop(session.tenant, None)

    def all(self) -> list[Session]:
        return list(self._sessions.values())

    def of_tenant(self, tenant: str) -> list[Session]:
        return [s for s in self._sessions.values() if s.tenant == tenant]


def too_many_sessions() -> TooManyRequests:
    return TooManyRequests(
        "Too many sessions: this tenant has reached its limit of open sessions; "
        "end an unused session (DELETE) or retry later",
        headers={"Retry-After": "30"},
    )


class SessionRegistry:
    """The SessionStore (backend.py) of one process: every live handshake-era session, with idle
    expiry and a per-tenant cap."""

    def __init__(
        self, idle_timeout_seconds: float, max_per_tenant: int, answer_timeout_seconds: float = 300.0
    ) -> None:
        self.idle_timeout_seconds = idle_timeout_seconds
        self.max_per_tenant = max_per_tenant
        self.answer_timeout_seconds = answer_timeout_seconds
        self.views = LocalViews()
        self._reserved: dict[str, int] = {}  # initializes on their way upstream, per tenant

    def __len__(self) -> int:
        return len(self.views)

    def count(self, tenant: str) -> int:
        return self.views.count(tenant)

    async def reserve(self, ctx: TenantContext) -> str:
        """Hold a place under the tenant's cap for an initialize, before any upstream call; the
        place becomes the session (`create`) or is given back (`release`)."""
        reserved = self._reserved.get(ctx.tenant, 0)
        if self.count(ctx.tenant) + reserved >= self.max_per_tenant:
            raise too_many_sessions()
        self._reserved[ctx.tenant] = reserved + 1
        return secrets.token_hex(8)

    def release(self, tenant: str, reservation: str) -> None:
        reserved = self._reserved.get(tenant, 0) - 1
        if reserved > 0:
            self._reserved[tenant] = reserved
        else:
            self._reserved.pop(tenant, None)

    async def create(
        self, ctx: TenantContext, protocol_version: str, upstream_session_id: str | None, reservation: str
    ) -> Session:
        """The session for an initialize that reserved its place."""
        self.release(ctx.tenant, reservation)
        session = Session.issue(ctx, protocol_version, upstream_session_id)
        self.views.keep(session)
        return session

    async def lookup(self, session_id: str, ctx: TenantContext) -> Session:
        """The caller's own live session, or SessionNotFound exactly as for an unknown id."""
        session = self.views.find(session_id, ctx)
        now = time.monotonic()
        if session is None or session.idle_for(now) > self.idle_timeout_seconds:
            raise SessionNotFound()
        session.last_seen = now
        return session

    async def remove(self, session: Session) -> None:
        self.views.forget(session)

    async def expired(self, now: float | None = None) -> list[Session]:
        moment = time.monotonic() if now is None else now
        return [s for s in self.views.all() if s.idle_for(moment) > self.idle_timeout_seconds]

    async def of_tenant(self, tenant: str) -> list[Session]:
        return self.views.of_tenant(tenant)

    def all(self) -> list[Session]:
        """The sessions this process holds (ended with it, unless they are shared)."""
        return self.views.all()

    @property
    def shared(self) -> bool:
        """Whether sessions outlive this process (other replicas serve them)."""
        return False

    def expect_answer(self, session: Session, request_id: RequestId) -> None:
        """A server-to-client request was relayed to this session: its answer may come back."""
        session.expect_answer(request_id)

    async def take_answer(self, session: Session, request_id: RequestId) -> bool:
        """True (and forgotten) when request_id is a server request this session still owes an answer."""
        return session.take_answer(request_id)

    async def give_up_answer(self, session: Session, request_id: RequestId) -> bool:
        return session.take_answer(request_id)
