"""SessionRegistry: binding to (tenant, subject), idle expiry, per-tenant caps, event ids, answers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from proxy.layers.sessions.registry import (
    MAX_EVENT_IDS,
    MAX_PENDING_SERVER_REQUESTS,
    Session,
    SessionRegistry,
)
from proxy.protocol.errors import SessionNotFound, TooManyRequests
from proxy.protocol.jsonrpc import parse_message
from proxy.types import TenantContext


def ctx(tenant: str = "acme", subject: str = "alice") -> TenantContext:
    return TenantContext(tenant, subject, "dev", frozenset(), time.time() + 600)


def registry(idle: float = 60.0, cap: int = 10) -> SessionRegistry:
    return SessionRegistry(idle_timeout_seconds=idle, max_per_tenant=cap)


async def new(reg: SessionRegistry, who: TenantContext | None = None) -> Session:
    """An initialize as the proxy runs it: a place under the cap first, then the session."""
    caller = who or ctx()
    reservation = await reg.reserve(caller)
    return await reg.create(caller, "2025-11-25", "upstream-sid", reservation)


# --- creation and binding ---------------------------------------------------------------------------


async def test_create_binds_the_session_to_the_caller() -> None:
    reg = registry()
    session = await new(reg)
    assert (session.tenant, session.subject) == ("acme", ctx().principal)
    assert session.upstream_session_id == "upstream-sid"
    assert session.id != "upstream-sid"
    assert len(session.id) >= 32  # 24 random bytes, url-safe
    assert await reg.lookup(session.id, ctx()) is session
    assert len(reg) == 1
    assert reg.count("acme") == 1


async def test_ids_are_unique_and_unguessable() -> None:
    reg = registry(cap=500)
    ids = {(await new(reg)).id for _ in range(300)}
    assert len(ids) == 300


async def test_audit_id_is_a_hash_not_the_id() -> None:
    session = await new(registry())
    assert session.audit_id != session.id
    assert session.id not in session.audit_id
    assert len(session.audit_id) == 16


@pytest.mark.parametrize(
    "thief",
    [
        ctx("globex", "alice"),  # other tenant, same subject
        ctx("acme", "mallory"),  # same tenant, other subject
        ctx("globex", "mallory"),
        ctx("ACME", "alice"),  # case variant of the tenant
        ctx("acme", "Alice"),
        ctx("acme", "alice "),
    ],
)
async def test_other_callers_get_not_found_exactly_as_for_an_unknown_id(thief: TenantContext) -> None:
    reg = registry()
    session = await new(reg)
    with pytest.raises(SessionNotFound) as foreign:
        await reg.lookup(session.id, thief)
    with pytest.raises(SessionNotFound) as unknown:
        await reg.lookup("never-issued-" + "x" * 20, thief)
    assert foreign.value.to_jsonrpc(1) == unknown.value.to_jsonrpc(1)
    assert (foreign.value.status, foreign.value.headers) == (unknown.value.status, unknown.value.headers)
    assert foreign.value.status == 404
    # The owner is unaffected by the attempt.
    assert await reg.lookup(session.id, ctx()) is session


async def test_unicode_subjects_compare_exactly() -> None:
    reg = registry()
    session = await new(reg, ctx("acme", "\u00e9ve"))
    assert await reg.lookup(session.id, ctx("acme", "\u00e9ve")) is session
    with pytest.raises(SessionNotFound):
        await reg.lookup(session.id, ctx("acme", "e\u0301ve"))  # decomposed form: a different subject


async def test_prefix_of_a_real_id_is_not_found() -> None:
    reg = registry()
    session = await new(reg)
    for guess in (session.id[:-1], session.id + "x", session.id.upper(), ""):
        with pytest.raises(SessionNotFound):
            await reg.lookup(guess, ctx())


# --- expiry -------------------------------------------------------------------------------------------


async def test_idle_session_is_not_found_and_listed_as_expired() -> None:
    reg = registry(idle=30)
    session = await new(reg)
    fresh = await new(reg)
    session.last_seen = time.monotonic() - 31
    with pytest.raises(SessionNotFound):
        await reg.lookup(session.id, ctx())
    assert await reg.expired() == [session]
    assert await reg.lookup(fresh.id, ctx()) is fresh


async def test_lookup_refreshes_last_seen() -> None:
    reg = registry(idle=30)
    session = await new(reg)
    session.last_seen = time.monotonic() - 29
    await reg.lookup(session.id, ctx())
    assert time.monotonic() - session.last_seen < 1
    assert await reg.expired() == []


async def test_expired_with_an_explicit_clock() -> None:
    reg = registry(idle=10)
    session = await new(reg)
    assert await reg.expired(now=session.last_seen + 9) == []
    assert await reg.expired(now=session.last_seen + 11) == [session]


async def test_a_session_with_an_open_get_stream_does_not_expire() -> None:
    reg = registry(idle=10)
    session = await new(reg)
    session.get_stream_open = True
    session.last_seen = time.monotonic() - 100
    assert await reg.expired() == []
    assert await reg.lookup(session.id, ctx()) is session


# --- per-tenant cap ---------------------------------------------------------------------------------


async def test_cap_is_per_tenant() -> None:
    reg = registry(cap=3)
    acme = [await new(reg, ctx("acme", f"user{i}")) for i in range(3)]
    with pytest.raises(TooManyRequests) as info:
        await new(reg, ctx("acme", "late"))
    assert info.value.status == 429
    assert info.value.headers.get("Retry-After") == "30"
    with pytest.raises(TooManyRequests):
        await reg.reserve(ctx("acme"))
    assert reg.count("acme") == 3
    # Other tenants are unaffected.
    globex = [await new(reg, ctx("globex")) for _ in range(3)]
    assert reg.count("globex") == 3
    assert len(reg) == 6
    assert {s.tenant for s in await reg.of_tenant("acme")} == {"acme"}
    assert await reg.of_tenant("acme") == acme
    assert await reg.of_tenant("globex") == globex


async def test_remove_frees_a_slot_and_forgets_the_session() -> None:
    reg = registry(cap=2)
    first, second = await new(reg), await new(reg)
    await reg.remove(first)
    assert first.closed
    assert reg.count("acme") == 1
    assert len(reg) == 1
    with pytest.raises(SessionNotFound):
        await reg.lookup(first.id, ctx())
    third = await new(reg)
    assert reg.all() == [second, third]


async def test_remove_is_idempotent_and_counts_never_go_negative() -> None:
    reg = registry(cap=2)
    session = await new(reg)
    other = await new(reg, ctx("globex"))
    await reg.remove(session)
    await reg.remove(session)
    assert reg.count("acme") == 0
    assert reg.count("globex") == 1
    await reg.remove(other)
    assert reg.count("globex") == 0
    assert len(reg) == 0
    assert reg.all() == []


async def test_a_closed_session_is_not_found_even_if_still_registered() -> None:
    reg = registry()
    session = await new(reg)
    session.closed = True
    with pytest.raises(SessionNotFound):
        await reg.lookup(session.id, ctx())


# --- event ids ---------------------------------------------------------------------------------------


async def test_event_ids_map_proxy_ids_to_upstream_ids() -> None:
    session = await new(registry())
    first = session.issue_event_id("upstream-abc")
    second = session.issue_event_id("upstream-def")
    assert (first, second) == ("1", "2")
    assert session.upstream_event_id("1") == "upstream-abc"
    assert session.upstream_event_id("2") == "upstream-def"
    assert session.upstream_event_id("3") is None
    assert session.upstream_event_id("upstream-abc") is None


async def test_no_upstream_event_id_gives_no_proxy_id() -> None:
    session = await new(registry())
    assert session.issue_event_id("") is None
    assert session.event_ids == {}
    assert session.issue_event_id("u") == "1"


async def test_event_ids_are_per_session() -> None:
    reg = registry()
    one, two = await new(reg), await new(reg)
    one.issue_event_id("one-secret")
    assert two.upstream_event_id("1") is None


async def test_event_id_map_is_bounded() -> None:
    session = await new(registry())
    for index in range(MAX_EVENT_IDS + 10):
        session.issue_event_id(f"u{index}")
    assert len(session.event_ids) == MAX_EVENT_IDS
    assert session.upstream_event_id("1") is None
    assert session.upstream_event_id("10") is None
    assert session.upstream_event_id("11") == "u10"
    assert session.upstream_event_id(str(MAX_EVENT_IDS + 10)) == f"u{MAX_EVENT_IDS + 9}"


async def test_a_resumable_post_stream_keeps_its_requests_summary_not_its_body() -> None:
    session = await new(registry())
    raw = b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"t","arguments":{"blob":"%s"}}}'
    request = parse_message(raw % (b"A" * 100_000))
    proxy_id = session.issue_event_id("u1", request)
    assert proxy_id is not None
    kept = session.post_stream_of(proxy_id)
    assert kept is not None
    assert (kept.request.id, kept.request.method, kept.request.name) == (7, "tools/call", "t")
    assert "arguments" not in kept.request.params  # (the client's body is not kept with the session)


# --- server-to-client requests ------------------------------------------------------------------------


async def test_expect_and_take_answer() -> None:
    session = await new(registry())
    session.expect_answer(5)
    session.expect_answer("s-1")
    assert session.take_answer("5") is False  # a string is not the integer id
    assert session.take_answer(5) is True
    assert session.take_answer(5) is False  # answered once only
    assert session.take_answer("s-1") is True
    assert session.take_answer(99) is False


async def test_answers_are_per_session() -> None:
    reg = registry()
    one, two = await new(reg), await new(reg)
    one.expect_answer(1)
    assert two.take_answer(1) is False
    assert one.take_answer(1) is True


async def test_pending_answers_are_bounded() -> None:
    session = await new(registry())
    for index in range(MAX_PENDING_SERVER_REQUESTS + 5):
        session.expect_answer(index)
    assert len(session.pending_server_requests) == MAX_PENDING_SERVER_REQUESTS
    assert session.take_answer(0) is False
    assert session.take_answer(4) is False
    assert session.take_answer(5) is True
    assert session.take_answer(MAX_PENDING_SERVER_REQUESTS + 4) is True


async def test_reservations_count_against_the_cap_until_created_or_released() -> None:
    reg = registry(cap=2)
    first = await reg.reserve(ctx("acme", "a"))
    second = await reg.reserve(ctx("acme", "b"))
    with pytest.raises(TooManyRequests):
        await reg.reserve(ctx("acme", "c"))  # two initializes on their way upstream fill the cap
    reg.release("acme", second)  # one failed upstream: its place is free again
    await reg.reserve(ctx("acme", "c"))
    await reg.create(ctx("acme", "a"), "2025-11-25", None, first)
    assert reg.count("acme") == 1
    with pytest.raises(TooManyRequests):
        await reg.reserve(ctx("acme", "d"))


async def test_a_busy_session_is_never_idle() -> None:
    reg = registry(idle=0.05)
    session = await new(reg)
    session.busy = 1
    time.sleep(0.08)
    assert await reg.expired() == []
    assert await reg.lookup(session.id, ctx()) is session
    session.busy = 0
    time.sleep(0.08)
    assert await reg.expired() == [session]


async def test_removing_a_session_ends_its_open_get_stream() -> None:
    import asyncio

    from proxy.http.relay import _until

    reg = registry()
    session = await new(reg)
    ended = session.ended = asyncio.Event()  # as relay_get sets it up
    shutdown = asyncio.Event()
    upstream_events: asyncio.Queue[str] = asyncio.Queue()

    async def events() -> AsyncIterator[str]:
        while True:
            yield await upstream_events.get()

    seen: list[str] = []

    async def relay() -> None:
        async for item in _until(events(), shutdown, ended):
            seen.append(item)

    task = asyncio.create_task(relay())
    upstream_events.put_nowait("one")
    await asyncio.sleep(0.05)
    await reg.remove(session)  # DELETE, expiry, or a reload that dropped the tenant's sessions
    await asyncio.wait_for(task, 1)  # the stream ended although the upstream never did
    upstream_events.put_nowait("two")
    assert seen == ["one"]
    assert not shutdown.is_set()


async def test_the_same_subject_from_another_issuer_is_another_principal() -> None:
    reg = registry()
    session = await new(reg)
    other_issuer = TenantContext("acme", "alice", "https://other-idp.test", frozenset(), 0.0)
    with pytest.raises(SessionNotFound):
        await reg.lookup(session.id, other_issuer)
    assert await reg.lookup(session.id, ctx()) is session
