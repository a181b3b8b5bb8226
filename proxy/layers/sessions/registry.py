"""Handshake-era sessions: proxy-issued ids bound to (tenant, subject), per-session state only.

The client only ever sees the proxy's id (>= 192 random bits); the upstream's session id stays in
here. A lookup succeeds only for the same tenant and subject that created the session; any other
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


@dataclass(eq=False)
class Session:
    id: str
    tenant: str
    subject: str
    protocol_version: str
    upstream_session_id: str | None = None
    last_seen: float = field(default_factory=time.monotonic)
    closed: bool = False
    # SSE event ids the proxy issued on this session -> the upstream's event id, for resumption.
    event_ids: OrderedDict[str, str] = field(default_factory=OrderedDict)
    next_event: int = 0
    # Ids of server-to-client requests relayed to this session and not answered yet.
    pending_server_requests: OrderedDict[RequestId, None] = field(default_factory=OrderedDict)
    # Client requests forwarded upstream and not answered yet: an answer replayed on a resumed GET
    # stream (the POST stream was lost) is delivered as the answer to that request.
    forwarded: OrderedDict[RequestId, Message] = field(default_factory=OrderedDict)
    # Those of them the client cancelled (notifications/cancelled): how they end is its doing.
    cancelled: set[RequestId] = field(default_factory=set)
    get_stream_open: bool = False
    busy: int = 0  # requests in flight: a session answering one is never idle
    ended: asyncio.Event | None = None  # set when the session is removed: its GET stream ends too

    @classmethod
    def issue(cls, ctx: TenantContext, protocol_version: str, upstream_session_id: str | None) -> Session:
        """A new session of the caller's, under a fresh proxy id (192 random bits)."""
        return cls(
            id=secrets.token_urlsafe(24),
            tenant=ctx.tenant,
            subject=ctx.subject,
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

    def issue_event_id(self, upstream_event_id: str) -> str | None:
        """A proxy event id standing for an upstream one; None when the upstream gave none."""
        if not upstream_event_id:
            return None
        self.next_event += 1
        proxy_id = str(self.next_event)
        self.event_ids[proxy_id] = upstream_event_id
        if len(self.event_ids) > MAX_EVENT_IDS:
            self.event_ids.popitem(last=False)
        return proxy_id

    def upstream_event_id(self, proxy_event_id: str) -> str | None:
        return self.event_ids.get(proxy_event_id)

    def expect_answer(self, request_id: RequestId) -> None:
        self.pending_server_requests[request_id] = None
        if len(self.pending_server_requests) > MAX_PENDING_SERVER_REQUESTS:
            self.pending_server_requests.popitem(last=False)

    def take_answer(self, request_id: RequestId) -> bool:
        """True (and forgotten) when request_id is a server request this session still owes an answer."""
        return self.pending_server_requests.pop(request_id, False) is None

    def forward(self, request: Message) -> None:
        if request.id is not None:
            self.forwarded[request.id] = request
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


class SessionRegistry:
    """All live handshake-era sessions of this process, with idle expiry and a per-tenant cap.

    The methods a request waits on are coroutines because the shared (Redis) registry, which keeps
    the same local Session objects for what belongs to one replica, does I/O in them.
    """

    def __init__(self, idle_timeout_seconds: float, max_per_tenant: int) -> None:
        self.idle_timeout_seconds = idle_timeout_seconds
        self.max_per_tenant = max_per_tenant
        self._sessions: dict[str, Session] = {}
        self._per_tenant: dict[str, int] = {}
        self._reserved: dict[str, int] = {}  # initializes on their way upstream, per tenant

    def __len__(self) -> int:
        return len(self._sessions)

    def count(self, tenant: str) -> int:
        return self._per_tenant.get(tenant, 0)

    def _too_many(self) -> TooManyRequests:
        return TooManyRequests(
            "Too many sessions: this tenant has reached its limit of open sessions; "
            "end an unused session (DELETE) or retry later",
            headers={"Retry-After": "30"},
        )

    async def reserve(self, ctx: TenantContext) -> str:
        """Hold a place under the tenant's cap for an initialize, before any upstream call; the
        place becomes the session (`create`) or is given back (`release`)."""
        reserved = self._reserved.get(ctx.tenant, 0)
        if self.count(ctx.tenant) + reserved >= self.max_per_tenant:
            raise self._too_many()
        self._reserved[ctx.tenant] = reserved + 1
        return secrets.token_hex(8)

    def release(self, tenant: str, reservation: str) -> None:
        reserved = self._reserved.get(tenant, 0) - 1
        if reserved > 0:
            self._reserved[tenant] = reserved
        else:
            self._reserved.pop(tenant, None)

    def _new(self, ctx: TenantContext, protocol_version: str, upstream_session_id: str | None) -> Session:
        session = Session.issue(ctx, protocol_version, upstream_session_id)
        self._keep(session)
        return session

    def _keep(self, session: Session) -> None:
        self._sessions[session.id] = session
        self._per_tenant[session.tenant] = self.count(session.tenant) + 1

    async def create(
        self, ctx: TenantContext, protocol_version: str, upstream_session_id: str | None, reservation: str
    ) -> Session:
        """The session for an initialize that reserved its place."""
        self.release(ctx.tenant, reservation)
        return self._new(ctx, protocol_version, upstream_session_id)

    def _local(self, session_id: str, ctx: TenantContext) -> Session | None:
        session = self._sessions.get(session_id)
        if (
            session is None
            or session.closed
            or not secrets.compare_digest(session.tenant, ctx.tenant)
            or not secrets.compare_digest(session.subject.encode(), ctx.subject.encode())
        ):
            return None
        return session

    async def lookup(self, session_id: str, ctx: TenantContext) -> Session:
        """The caller's own live session, or SessionNotFound exactly as for an unknown id."""
        session = self._local(session_id, ctx)
        now = time.monotonic()
        if session is None or session.idle_for(now) > self.idle_timeout_seconds:
            raise SessionNotFound()
        session.last_seen = now
        return session

    def _forget(self, session: Session) -> None:
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

    async def remove(self, session: Session) -> None:
        self._forget(session)

    async def expired(self, now: float | None = None) -> list[Session]:
        moment = time.monotonic() if now is None else now
        return [s for s in self._sessions.values() if s.idle_for(moment) > self.idle_timeout_seconds]

    async def of_tenant(self, tenant: str) -> list[Session]:
        return [s for s in self._sessions.values() if s.tenant == tenant]

    def all(self) -> list[Session]:
        """The sessions this process holds (ended with it, unless they are shared)."""
        return list(self._sessions.values())

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
