"""What the sessions layer needs of a backend: `SessionRegistry` (registry.py) keeps sessions in
this process; `backends/redis/sessions.py` shares them between replicas, each replica keeping its
own views (registry.LocalViews) of what belongs to it."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

from proxy.layers.sessions.registry import Session
from proxy.types import RequestId, TenantContext


class SessionStore(Protocol):
    idle_timeout_seconds: float
    max_per_tenant: int
    answer_timeout_seconds: float  # how long an upstream waits for a client's answer

    def __len__(self) -> int: ...

    def count(self, tenant: str) -> int:
        """Sessions of `tenant` this process holds (metrics)."""
        ...

    @property
    def shared(self) -> bool:
        """Whether sessions outlive this process (other replicas serve them)."""
        ...

    async def reserve(self, ctx: TenantContext) -> str:
        """A place under the tenant's cap for an initialize (TooManyRequests when full)."""
        ...

    def release(self, tenant: str, reservation: str) -> None:
        """Give back a place no session came of."""
        ...

    async def create(
        self, ctx: TenantContext, protocol_version: str, upstream_session_id: str | None, reservation: str
    ) -> Session: ...

    async def lookup(self, session_id: str, ctx: TenantContext) -> Session:
        """The caller's own live session, or SessionNotFound exactly as for an unknown id."""
        ...

    async def remove(self, session: Session) -> None: ...
    async def expired(self, now: float | None = None) -> list[Session]: ...
    async def of_tenant(self, tenant: str) -> list[Session]: ...
    def all(self) -> list[Session]: ...

    def expect_answer(self, session: Session, request_id: RequestId) -> Awaitable[None] | None:
        """A server-to-client request is being relayed to this session: its answer may come back.
        What it returns (a shared store's write) is awaited before the request leaves, so that the
        answer finds it on whichever replica it reaches."""
        ...

    async def take_answer(self, session: Session, request_id: RequestId) -> bool:
        """True (and forgotten) when request_id is a server request this session owes an answer."""
        ...

    async def give_up_answer(self, session: Session, request_id: RequestId) -> bool:
        """True (and forgotten) when the answer is still owed, so the waiting upstream is told it
        will not come; False when the client answered (through any replica)."""
        ...
