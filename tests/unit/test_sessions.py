"""SessionRegistry: binding to (tenant, subject), idle expiry, per-tenant caps, event ids, answers."""

from __future__ import annotations

import time

import pytest

from proxy.errors import SessionNotFound, TooManyRequests
from proxy.sessions import MAX_EVENT_IDS, MAX_PENDING_SERVER_REQUESTS, Session, SessionRegistry
from proxy.types import TenantContext


def ctx(tenant: str = "acme", subject: str = "alice") -> TenantContext:
    return TenantContext(tenant, subject, "dev", frozenset(), time.time() + 600)


def registry(idle: float = 60.0, cap: int = 10) -> SessionRegistry:
    return SessionRegistry(idle_timeout_seconds=idle, max_per_tenant=cap)


def new(reg: SessionRegistry, who: TenantContext | None = None) -> Session:
    """An initialize as the proxy runs it: a place under the cap first, then the session."""
    caller = who or ctx()
    reg.reserve(caller)
    return reg.create(caller, "2025-11-25", "upstream-sid")


# --- creation and binding ---------------------------------------------------------------------------


def test_create_binds_the_session_to_the_caller() -> None:
    reg = registry()
    session = new(reg)
    assert (session.tenant, session.subject) == ("acme", "alice")
    assert session.upstream_session_id == "upstream-sid"
    assert session.id != "upstream-sid"
    assert len(session.id) >= 32  # 24 random bytes, url-safe
    assert reg.lookup(session.id, ctx()) is session
    assert len(reg) == 1
    assert reg.count("acme") == 1


def test_ids_are_unique_and_unguessable() -> None:
    reg = registry(cap=500)
    ids = {new(reg).id for _ in range(300)}
    assert len(ids) == 300


def test_audit_id_is_a_hash_not_the_id() -> None:
    session = new(registry())
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
def test_other_callers_get_not_found_exactly_as_for_an_unknown_id(thief: TenantContext) -> None:
    reg = registry()
    session = new(reg)
    with pytest.raises(SessionNotFound) as foreign:
        reg.lookup(session.id, thief)
    with pytest.raises(SessionNotFound) as unknown:
        reg.lookup("never-issued-" + "x" * 20, thief)
    assert foreign.value.to_jsonrpc(1) == unknown.value.to_jsonrpc(1)
    assert (foreign.value.status, foreign.value.headers) == (unknown.value.status, unknown.value.headers)
    assert foreign.value.status == 404
    # The owner is unaffected by the attempt.
    assert reg.lookup(session.id, ctx()) is session


def test_unicode_subjects_compare_exactly() -> None:
    reg = registry()
    session = new(reg, ctx("acme", "\u00e9ve"))
    assert reg.lookup(session.id, ctx("acme", "\u00e9ve")) is session
    with pytest.raises(SessionNotFound):
        reg.lookup(session.id, ctx("acme", "e\u0301ve"))  # decomposed form: a different subject


def test_prefix_of_a_real_id_is_not_found() -> None:
    reg = registry()
    session = new(reg)
    for guess in (session.id[:-1], session.id + "x", session.id.upper(), ""):
        with pytest.raises(SessionNotFound):
            reg.lookup(guess, ctx())


# --- expiry -------------------------------------------------------------------------------------------


def test_idle_session_is_not_found_and_listed_as_expired() -> None:
    reg = registry(idle=30)
    session = new(reg)
    fresh = new(reg)
    session.last_seen = time.monotonic() - 31
    with pytest.raises(SessionNotFound):
        reg.lookup(session.id, ctx())
    assert reg.expired() == [session]
    assert reg.lookup(fresh.id, ctx()) is fresh


def test_lookup_refreshes_last_seen() -> None:
    reg = registry(idle=30)
    session = new(reg)
    session.last_seen = time.monotonic() - 29
    reg.lookup(session.id, ctx())
    assert time.monotonic() - session.last_seen < 1
    assert reg.expired() == []


def test_expired_with_an_explicit_clock() -> None:
    reg = registry(idle=10)
    session = new(reg)
    assert reg.expired(now=session.last_seen + 9) == []
    assert reg.expired(now=session.last_seen + 11) == [session]


def test_a_session_with_an_open_get_stream_does_not_expire() -> None:
    reg = registry(idle=10)
    session = new(reg)
    session.get_stream_open = True
    session.last_seen = time.monotonic() - 100
    assert reg.expired() == []
    assert reg.lookup(session.id, ctx()) is session


# --- per-tenant cap ---------------------------------------------------------------------------------


def test_cap_is_per_tenant() -> None:
    reg = registry(cap=3)
    acme = [new(reg, ctx("acme", f"user{i}")) for i in range(3)]
    with pytest.raises(TooManyRequests) as info:
        new(reg, ctx("acme", "late"))
    assert info.value.status == 429
    assert info.value.headers.get("Retry-After") == "30"
    with pytest.raises(TooManyRequests):
        reg.reserve(ctx("acme"))
    assert reg.count("acme") == 3
    # Other tenants are unaffected.
    globex = [new(reg, ctx("globex")) for _ in range(3)]
    assert reg.count("globex") == 3
    assert len(reg) == 6
    assert {s.tenant for s in reg.of_tenant("acme")} == {"acme"}
    assert reg.of_tenant("acme") == acme
    assert reg.of_tenant("globex") == globex


def test_remove_frees_a_slot_and_forgets_the_session() -> None:
    reg = registry(cap=2)
    first, second = new(reg), new(reg)
    reg.remove(first)
    assert first.closed
    assert reg.count("acme") == 1
    assert len(reg) == 1
    with pytest.raises(SessionNotFound):
        reg.lookup(first.id, ctx())
    third = new(reg)
    assert reg.all() == [second, third]


def test_remove_is_idempotent_and_counts_never_go_negative() -> None:
    reg = registry(cap=2)
    session = new(reg)
    other = new(reg, ctx("globex"))
    reg.remove(session)
    reg.remove(session)
    assert reg.count("acme") == 0
    assert reg.count("globex") == 1
    reg.remove(other)
    assert reg.count("globex") == 0
    assert len(reg) == 0
    assert reg.all() == []


def test_a_closed_session_is_not_found_even_if_still_registered() -> None:
    reg = registry()
    session = new(reg)
    session.closed = True
    with pytest.raises(SessionNotFound):
        reg.lookup(session.id, ctx())


# --- event ids ---------------------------------------------------------------------------------------


def test_event_ids_map_proxy_ids_to_upstream_ids() -> None:
    session = new(registry())
    first = session.issue_event_id("upstream-abc")
    second = session.issue_event_id("upstream-def")
    assert (first, second) == ("1", "2")
    assert session.upstream_event_id("1") == "upstream-abc"
    assert session.upstream_event_id("2") == "upstream-def"
    assert session.upstream_event_id("3") is None
    assert session.upstream_event_id("upstream-abc") is None


def test_no_upstream_event_id_gives_no_proxy_id() -> None:
    session = new(registry())
    assert session.issue_event_id("") is None
    assert session.event_ids == {}
    assert session.issue_event_id("u") == "1"


def test_event_ids_are_per_session() -> None:
    reg = registry()
    one, two = new(reg), new(reg)
    one.issue_event_id("one-secret")
    assert two.upstream_event_id("1") is None


def test_event_id_map_is_bounded() -> None:
    session = new(registry())
    for index in range(MAX_EVENT_IDS + 10):
        session.issue_event_id(f"u{index}")
    assert len(session.event_ids) == MAX_EVENT_IDS
    assert session.upstream_event_id("1") is None
    assert session.upstream_event_id("10") is None
    assert session.upstream_event_id("11") == "u10"
    assert session.upstream_event_id(str(MAX_EVENT_IDS + 10)) == f"u{MAX_EVENT_IDS + 9}"


# --- server-to-client requests ------------------------------------------------------------------------


def test_expect_and_take_answer() -> None:
    session = new(registry())
    session.expect_answer(5)
    session.expect_answer("s-1")
    assert session.take_answer("5") is False  # a string is not the integer id
    assert session.take_answer(5) is True
    assert session.take_answer(5) is False  # answered once only
    assert session.take_answer("s-1") is True
    assert session.take_answer(99) is False


def test_answers_are_per_session() -> None:
    reg = registry()
    one, two = new(reg), new(reg)
    one.expect_answer(1)
    assert two.take_answer(1) is False
    assert one.take_answer(1) is True


def test_pending_answers_are_bounded() -> None:
    session = new(registry())
    for index in range(MAX_PENDING_SERVER_REQUESTS + 5):
        session.expect_answer(index)
    assert len(session.pending_server_requests) == MAX_PENDING_SERVER_REQUESTS
    assert session.take_answer(0) is False
    assert session.take_answer(4) is False
    assert session.take_answer(5) is True
    assert session.take_answer(MAX_PENDING_SERVER_REQUESTS + 4) is True


def test_reservations_count_against_the_cap_until_created_or_released() -> None:
    reg = registry(cap=2)
    reg.reserve(ctx("acme", "a"))
    reg.reserve(ctx("acme", "b"))
    with pytest.raises(TooManyRequests):
        reg.reserve(ctx("acme", "c"))  # two initializes on their way upstream fill the cap
    reg.release("acme")  # one failed upstream: its place is free again
    reg.reserve(ctx("acme", "c"))
    reg.create(ctx("acme", "a"), "2025-11-25", None)
    assert reg.count("acme") == 1
    with pytest.raises(TooManyRequests):
        reg.reserve(ctx("acme", "d"))


def test_a_busy_session_is_never_idle() -> None:
    reg = registry(idle=0.05)
    session = new(reg)
    session.busy = 1
    time.sleep(0.08)
    assert reg.expired() == []
    assert reg.lookup(session.id, ctx()) is session
    session.busy = 0
    time.sleep(0.08)
    assert reg.expired() == [session]
