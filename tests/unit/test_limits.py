"""Per-tenant limits without sockets: bucket refill, concurrency slots, the breaker's three states."""

from __future__ import annotations

import time

import pytest

from proxy.config import LimitsConfig
from proxy.layers.limits.limiter import CircuitBreaker, LocalLimiter, TenantLimits, TokenBucket
from proxy.protocol.errors import TooManyRequests, UpstreamUnavailable


def test_bucket_allows_a_burst_then_refills_at_the_rate() -> None:
    bucket = TokenBucket(rate=2.0, capacity=3.0)
    now = bucket.updated
    assert [bucket.take(now) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(now) == pytest.approx(0.5)
    assert bucket.take(now + 0.5) == 0.0
    assert bucket.take(now + 0.5) > 0
    assert bucket.take(now + 100) == 0.0  # refill is capped at the capacity
    assert bucket.tokens == pytest.approx(2.0)


def test_breaker_opens_fails_fast_half_opens_and_closes() -> None:
    breaker = CircuitBreaker(threshold=2, open_seconds=10)
    breaker.record(False, 0)
    assert breaker.admit(1) == 0.0
    breaker.record(False, 1)
    assert breaker.is_open
    assert breaker.admit(5) == pytest.approx(6)
    assert breaker.admit(11.5) == 0.0  # the one trial request
    assert breaker.admit(11.6) > 0  # nobody else while it runs
    breaker.record(False, 12)  # the trial failed: open again
    assert breaker.admit(13) == pytest.approx(9)
    assert breaker.admit(22.5) == 0.0
    breaker.record(True, 23)
    assert not breaker.is_open
    assert breaker.admit(23) == 0.0


def test_one_principals_timeouts_never_open_the_breaker_two_principals_do() -> None:
    """A call's length follows its arguments: one user's slow calls are not the upstream failing."""
    breaker = CircuitBreaker(threshold=2, open_seconds=10)
    for now in range(5):
        breaker.record(False, now, caused_by="mallory")
    assert not breaker.is_open
    breaker.record(False, 6, caused_by="bob")  # a second user's call timed out too
    assert breaker.is_open
    breaker.record(True, 17)
    assert not breaker.is_open
    breaker.record(False, 18, caused_by="mallory")
    breaker.record(False, 19)  # any other fault counts as before
    assert breaker.is_open


def test_tenant_limits_refuse_with_the_right_error_and_release_slots() -> None:
    limits = TenantLimits(LimitsConfig(max_concurrent=1, circuit_failures=1))
    limits.admit()
    with pytest.raises(TooManyRequests) as refused:
        limits.admit()
    assert refused.value.data == {"limit": "concurrency"}
    limits.release()
    limits.admit()  # the circuit is not the gate here: it is checked where the upstream call is made
    assert limits.admit_upstream() is False
    limits.breaker.record(False, time.monotonic())
    with pytest.raises(UpstreamUnavailable) as failing:
        limits.admit_upstream()
    assert failing.value.status == 503
    assert int(failing.value.headers["Retry-After"]) > 0


def test_an_unused_trial_gives_its_place_back() -> None:
    limits = TenantLimits(LimitsConfig(circuit_failures=1, circuit_open_seconds=0.01))
    limits.breaker.record(False, time.monotonic())
    time.sleep(0.02)
    assert limits.admit_upstream() is True  # the half-open trial
    with pytest.raises(UpstreamUnavailable):
        limits.admit_upstream()  # nobody else while it runs
    limits.breaker.abandon()  # its client went away before any verdict
    assert limits.admit_upstream() is True


def test_rate_refusal_names_the_limit() -> None:
    limits = TenantLimits(LimitsConfig(requests_per_second=1, burst=1))
    limits.admit()
    with pytest.raises(TooManyRequests) as refused:
        limits.admit()
    assert refused.value.data == {"limit": "rate"}
    assert refused.value.headers["Retry-After"] == "1"


def test_limiter_keeps_state_per_tenant_until_settings_change() -> None:
    limiter = LocalLimiter()
    settings = LimitsConfig(max_concurrent=1)
    acme = limiter.of("acme", settings)
    acme.admit()
    assert limiter.of("acme", settings) is acme
    assert limiter.of("globex", settings) is not acme
    limiter.of("globex", settings).admit()  # another tenant's slot is its own
    assert limiter.of("acme", LimitsConfig(max_concurrent=2)) is not acme
    limiter.forget("acme")
    assert not limiter.circuit_open("acme")


# --- event-loop work --------------------------------------------------------------------------------


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector frees it


async def test_a_garbage_collection_during_a_step_is_not_charged_to_its_tenant() -> None:
    """A collection runs inside whichever step allocated last: the process's housekeeping, not the
    tenant's work (in a large process a full one holds the loop for tens of milliseconds)."""
    import gc

    from proxy.layers.limits.work import Metered

    garbage = [_Node() for _ in range(300_000)]  # enough that a full collection takes > 2 ms
    del garbage

    async def collects() -> int:
        return gc.collect()

    metered = Metered(collects())
    assert await metered > 0  # (the collection ran inside the step, and freed the cycles)
    assert metered.seconds == 0.0


async def test_a_step_is_charged_its_cpu_time_beyond_an_ordinary_step_never_its_wall_time() -> None:
    """Steps are judged by the wall clock first (cheap) and charged their CPU time: a step that
    works past the allowance is charged, one that holds the loop without working (the OS ran
    something else, here a sleep) is not."""
    import time

    from proxy.layers.limits.work import ORDINARY_SECONDS, Metered

    async def works() -> None:
        began = time.thread_time()
        while time.thread_time() - began < 4 * ORDINARY_SECONDS:
            pass

    async def waits_blocked() -> None:
        time.sleep(4 * ORDINARY_SECONDS)

    working, blocked = Metered(works()), Metered(waits_blocked())
    await working
    await blocked
    assert working.seconds > 0
    assert blocked.seconds == 0.0
