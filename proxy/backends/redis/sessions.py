"""Handshake-era sessions in Redis, so a POST for a session can be served by any replica.

    <prefix>:{<tenant>}:session:<id>          hash: tenant, subject, protocol version, upstream
                                              session id, created; expires after idle_timeout_seconds
                                              unused
    <prefix>:{<tenant>}:session:<id>:pending  server-to-client request ids the session owes answers to
    <prefix>:{<tenant>}:sessions              sorted set of live ids (and reservations) by last use:
                                              the per-tenant cap, kept atomically by a Lua script
    <prefix>:{<tenant>}:upstream-sessions     hash: id -> protocol version and upstream session id,
                                              kept until the session is ended upstream (it outlives
                                              the record)
    (all in the tenant's hash slot: each script and transaction below names keys of one tenant)
    <prefix>:session-tenants                  set: tenants that have had sessions (where a sweep looks
                                              for orphans), a key of its own

A lookup names the caller's tenant in the key and checks tenant and subject inside Redis, so another
tenant's or user's id finds nothing, exactly like an unknown one. What belongs to one replica (an
open GET stream, its event ids for resumption, requests in flight) stays in that replica's local
Session object: a session's GET stream is served by the replica that holds it (sticky routing).
Redis unreachable: a session cannot be verified, so it is not found (404); none can be created (503).

A session is ended upstream exactly once, by the replica whose ZREM takes it out of the live set:
its own DELETE, the sweep of the replica holding a view of it, or, for a session whose replica died
(an orphan: its record expired and nobody holds it), any replica's sweep.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import time
from collections.abc import Awaitable
from typing import Any

from proxy.backends.redis.client import RedisState, StateUnavailable
from proxy.layers.sessions.registry import LocalViews, Session, too_many_sessions
from proxy.protocol.errors import SessionNotFound, SessionStoreUnavailable
from proxy.types import RequestId, TenantContext

_KEEP_ENDS_MS = 24 * 3600 * 1000  # how long past the last session an unended one is still ended
_ORPHANS_PER_SWEEP = 100  # per tenant and sweep

_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{16,128}")  # what secrets.token_urlsafe gives, and nothing else

# Members idle past the timeout are not counted, but stay until a sweep has ended them upstream.
_RESERVE = """
local live = redis.call('ZCOUNT', KEYS[1], '(' .. (tonumber(ARGV[1]) - tonumber(ARGV[2])), '+inf')
if live >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000) + 60000)
return 1
"""

_LOOKUP = """
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return nil end
local record = {}
for i = 1, #fields, 2 do record[fields[i]] = fields[i + 1] end
if record['tenant'] ~= ARGV[5] or record['subject'] ~= ARGV[1] then return nil end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
redis.call('ZADD', KEYS[2], 'XX', ARGV[3], ARGV[4])
return {record['protocol_version'], record['upstream_session_id'], record['created'] or ''}
"""


class RedisSessionRegistry:
    """The SessionStore (layers/sessions/backend.py) shared by replicas: the records in Redis, this
    replica's views of the sessions it serves in a LocalViews."""

    clock_margin_seconds = 30.0  # replicas' clocks may differ this much: an orphan is older still

    def __init__(
        self,
        state: RedisState,
        idle_timeout_seconds: float,
        max_per_tenant: int,
        answer_timeout_seconds: float = 300.0,
    ) -> None:
        self.idle_timeout_seconds = idle_timeout_seconds
        self.max_per_tenant = max_per_tenant
        self.answer_timeout_seconds = answer_timeout_seconds
        self.views = LocalViews()
        self.state = state
        self._reserve = state.client.register_script(_RESERVE)
        self._lookup = state.client.register_script(_LOOKUP)

    @property
    def shared(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self.views)

    def count(self, tenant: str) -> int:
        return self.views.count(tenant)

    def all(self) -> list[Session]:
        return self.views.all()

    def _upstreams(self, tenant: str) -> str:
        return self.state.key(tenant, "upstream-sessions")

    @property
    def _tenants(self) -> str:
        return f"{self.state.prefix}:session-tenants"

    def _keys(self, tenant: str, session_id: str) -> tuple[str, str, str]:
        record = self.state.key(tenant, "session", session_id)
        return record, self.state.key(tenant, "sessions"), f"{record}:pending"

    @property
    def _idle_ms(self) -> int:
        return int(self.idle_timeout_seconds * 1000)

    async def reserve(self, ctx: TenantContext) -> str:
        reservation = f"reserved:{secrets.token_hex(8)}"
        args = [time.time(), self.idle_timeout_seconds, self.max_per_tenant, reservation]
        try:
            placed = await self.state.call(
                "session_reserve", self._reserve(keys=[self.state.key(ctx.tenant, "sessions")], args=args)
            )
        except StateUnavailable:
            raise SessionStoreUnavailable() from None
        if not placed:
            raise too_many_sessions()
        return reservation

    def release(self, tenant: str, reservation: str) -> None:
        live = self.state.key(tenant, "sessions")
        self.state.defer(lambda pipeline: pipeline.zrem(live, reservation))

    async def create(
        self, ctx: TenantContext, protocol_version: str, upstream_session_id: str | None, reservation: str
    ) -> Session:
        session = Session.issue(ctx, protocol_version, upstream_session_id)
        record, live, _ = self._keys(ctx.tenant, session.id)
        pipeline = self.state.client.pipeline(transaction=True)
        pipeline.hset(
            record,
            mapping={
                "tenant": ctx.tenant,
                "subject": ctx.principal,
                "protocol_version": protocol_version,
                "upstream_session_id": upstream_session_id or "",
                "created": repr(session.created),
            },
        )
        pipeline.pexpire(record, self._idle_ms)
        pipeline.zrem(live, reservation)
        pipeline.zadd(live, {session.id: time.time()})
        upstreams = self._upstreams(ctx.tenant)
        pipeline.hset(upstreams, session.id, _upstream_entry(protocol_version, upstream_session_id))
        pipeline.pexpire(upstreams, self._idle_ms + _KEEP_ENDS_MS)
        try:
            await self.state.call("session_create", pipeline.execute())
        except StateUnavailable:  # the reservation is given back when the request finishes
            raise SessionStoreUnavailable() from None
        tenants, tenant = self._tenants, ctx.tenant  # a key of its own (its own slot in a cluster)
        self.state.defer(lambda later: later.sadd(tenants, tenant))
        self.views.keep(session)
        return session

    async def lookup(self, session_id: str, ctx: TenantContext) -> Session:
        if _SESSION_ID.fullmatch(session_id) is None:  # never a key this proxy did not make
            raise SessionNotFound()
        record, live, pending = self._keys(ctx.tenant, session_id)
        try:
            found = await self.state.call(
                "session_lookup",
                self._lookup(
                    keys=[record, live, pending],
                    args=[ctx.principal, self._idle_ms, time.time(), session_id, ctx.tenant],
                ),
            )
        except StateUnavailable:
            raise SessionNotFound() from None  # a session that cannot be verified is nobody's
        local = self.views.find(session_id, ctx)
        if found is None:
            if local is not None:
                self.views.forget(local)
            raise SessionNotFound()
        if local is None:  # created on another replica: this one now holds a local view of it
            version, upstream_id, created = (part.decode() for part in found)
            local = Session(
                id=session_id,
                tenant=ctx.tenant,
                subject=ctx.principal,
                protocol_version=version,
                upstream_session_id=upstream_id or None,
                created=_seconds(created),
            )
            self.views.keep(local)
        local.last_seen = time.monotonic()
        return local

    async def remove(self, session: Session) -> None:
        self.views.forget(session)
        record, live, pending = self._keys(session.tenant, session.id)
        pipeline = self.state.client.pipeline(transaction=True)
        pipeline.delete(record, pending)
        pipeline.zrem(live, session.id)
        pipeline.hdel(self._upstreams(session.tenant), session.id)
        with contextlib.suppress(StateUnavailable):  # if Redis is away, the record expires on its own
            await self.state.call("session_remove", pipeline.execute())

    async def expired(self, now: float | None = None) -> list[Session]:
        """Sessions to end upstream now, each claimed by this replica alone: local views whose Redis
        record is gone (expired, or ended through another replica, which then ended it itself), and
        orphans: sessions idle past the timeout that no replica holds (theirs died).

        A busy or streaming view keeps its record alive from here; an idle one past the timeout
        is kept (and refreshed) while its record lives, since another replica may be using it."""
        moment = time.monotonic() if now is None else now
        views = self.views.all()
        gone: list[Session] = []
        for start in range(0, len(views), 500):
            chunk = views[start : start + 500]
            pipeline = self.state.client.pipeline(transaction=False)
            for session in chunk:
                record, live, pending = self._keys(session.tenant, session.id)
                if session.busy or session.get_stream_open:
                    pipeline.pexpire(record, self._idle_ms)
                    pipeline.pexpire(pending, self._idle_ms)
                    pipeline.zadd(live, {session.id: time.time()}, xx=True)
                else:
                    pipeline.exists(record)
            try:
                answers = iter(await self.state.call("session_sweep", pipeline.execute()))
            except StateUnavailable:
                return []  # nothing can be judged now; the next sweep tries again
            for session in chunk:
                alive = bool(next(answers))
                if session.busy or session.get_stream_open:
                    next(answers), next(answers)
                if not alive:
                    gone.append(session)
                elif session.idle_for(moment) > self.idle_timeout_seconds:
                    session.last_seen = moment  # in use through another replica
        try:
            ended = await self._claim(gone)
            held = {session.id for session in self.views.all()}
            ended += await self._claim(await self._orphans(held))
        except StateUnavailable:
            return []
        return ended

    async def _orphans(self, held: set[str]) -> list[Session]:
        """Sessions idle past the timeout (with a margin for clocks) whose record is gone and that
        this replica does not hold: their replica died, or ended them (then the claim finds nothing).
        Reservations as old are given back: their initialize died with its replica."""
        tenants = sorted(
            raw.decode()
            for raw in await self.state.call("session_tenants", self.state.client.smembers(self._tenants))
        )
        cutoff = time.time() - self.idle_timeout_seconds - self.clock_margin_seconds
        found: list[Session] = []
        for start in range(0, len(tenants), 500):
            chunk = tenants[start : start + 500]
            pipeline = self.state.client.pipeline(transaction=False)
            for tenant in chunk:
                pipeline.zrangebyscore(
                    self.state.key(tenant, "sessions"), "-inf", cutoff, start=0, num=_ORPHANS_PER_SWEEP
                )
            stale: list[tuple[str, str]] = []
            for tenant, members in zip(
                chunk, await self.state.call("session_orphans", pipeline.execute()), strict=True
            ):
                stale += [(tenant, member.decode()) for member in members if member.decode() not in held]
            if not stale:
                continue
            pipeline = self.state.client.pipeline(transaction=False)
            for tenant, member in stale:
                if member.startswith("reserved:"):
                    pipeline.zrem(self.state.key(tenant, "sessions"), member)
                else:
                    pipeline.exists(self._keys(tenant, member)[0])
            answers = await self.state.call("session_orphans", pipeline.execute())
            for (tenant, member), exists in zip(stale, answers, strict=True):
                if not member.startswith("reserved:") and not exists:
                    found.append(
                        Session(id=member, tenant=tenant, subject="", protocol_version="", closed=True)
                    )
        return found

    async def _claim(self, sessions: list[Session]) -> list[Session]:
        """Take sessions out of the live set; those this replica took (ZREM said so) are returned,
        with what ending them upstream needs; the others were ended elsewhere and are only forgotten."""
        by_tenant: dict[str, list[Session]] = {}
        for session in sessions:
            by_tenant.setdefault(session.tenant, []).append(session)
        claimed: list[Session] = []
        for tenant, group in by_tenant.items():  # one transaction per tenant: its keys share a slot
            live, upstreams = self.state.key(tenant, "sessions"), self._upstreams(tenant)
            pipeline = self.state.client.pipeline(transaction=True)
            for session in group:
                pipeline.zrem(live, session.id)
                pipeline.hget(upstreams, session.id)
                pipeline.hdel(upstreams, session.id)
            answers = iter(await self.state.call("session_claim", pipeline.execute()))
            for session in group:
                taken, entry, _ = next(answers), next(answers), next(answers)
                if not taken:
                    self.views.forget(session)
                    continue
                if session.closed and entry:  # an orphan: what ending it upstream needs
                    session.protocol_version, session.upstream_session_id = _parse_upstream_entry(entry)
                claimed.append(session)
        return claimed

    async def of_tenant(self, tenant: str) -> list[Session]:
        """The tenant's live sessions on every replica: this replica's own views where it holds
        them (what only it knows: an open GET stream, requests in flight), else from the records;
        each last seen when any replica last used it. Nothing when Redis cannot be reached."""
        now, moment = time.time(), time.monotonic()
        try:
            members = await self.state.call(
                "session_list",
                self.state.client.zrange(self.state.key(tenant, "sessions"), 0, -1, withscores=True),
            )
            live = [(raw.decode(), score) for raw, score in members if not raw.startswith(b"reserved:")]
            pipeline = self.state.client.pipeline(transaction=False)
            for session_id, _ in live:
                pipeline.hgetall(self._keys(tenant, session_id)[0])
            records = await self.state.call("session_get", pipeline.execute()) if live else []
        except StateUnavailable:
            return []
        sessions: list[Session] = []
        for (session_id, used_at), record in zip(live, records, strict=True):
            if not record:  # expired: a sweep ends it upstream
                continue
            session = self.views.held(session_id) or _session_from(tenant, session_id, record)
            session.last_seen = max(session.last_seen, moment - (now - used_at))
            sessions.append(session)
        return sessions

    def expect_answer(self, session: Session, request_id: RequestId) -> Awaitable[None]:
        session.expect_answer(request_id)
        return self._remember(session, request_id)

    async def _remember(self, session: Session, request_id: RequestId) -> None:
        """Awaited before the request leaves: its answer may reach another replica first."""
        _, _, pending = self._keys(session.tenant, session.id)
        pipeline = self.state.client.pipeline(transaction=False)
        pipeline.sadd(pending, json.dumps(request_id))
        pipeline.pexpire(pending, self._idle_ms)
        with contextlib.suppress(StateUnavailable):  # then only this replica can take the answer
            await self.state.call("session_expect_answer", pipeline.execute())

    async def give_up_answer(self, session: Session, request_id: RequestId) -> bool:
        _, _, pending = self._keys(session.tenant, session.id)
        local = session.take_answer(request_id)
        try:  # the shared set decides: the answer may have come through another replica
            removed = await self.state.call(
                "session_give_up_answer", self.state.client.srem(pending, json.dumps(request_id))
            )
        except StateUnavailable:
            return local
        return bool(removed)

    async def take_answer(self, session: Session, request_id: RequestId) -> bool:
        _, _, pending = self._keys(session.tenant, session.id)
        local = session.take_answer(request_id)
        try:  # the request may have been relayed by another replica: the shared set decides
            removed = await self.state.call(
                "session_take_answer", self.state.client.srem(pending, json.dumps(request_id))
            )
        except StateUnavailable:
            return local
        return bool(removed) or local


def _upstream_entry(protocol_version: str, upstream_session_id: str | None) -> str:
    return json.dumps([protocol_version, upstream_session_id])


def _parse_upstream_entry(entry: bytes) -> tuple[str, str | None]:
    try:
        version, upstream_id = json.loads(entry)
    except (ValueError, TypeError):
        return "", None
    return str(version), upstream_id if isinstance(upstream_id, str) and upstream_id else None


def _session_from(tenant: str, session_id: str, record: dict[Any, Any]) -> Session:
    def field(name: str) -> str:
        value = record.get(name.encode(), b"")
        return value.decode() if isinstance(value, bytes) else str(value)

    return Session(
        id=session_id,
        tenant=tenant,
        subject=field("subject"),
        protocol_version=field("protocol_version"),
        upstream_session_id=field("upstream_session_id") or None,
        created=_seconds(field("created")),
        last_seen=0.0,  # (of_tenant sets when it was last used)
    )


def _seconds(text: str) -> float:
    """A wall-clock time as stored; 0.0 for a record written before it was kept."""
    try:
        return float(text)
    except ValueError:
        return 0.0
