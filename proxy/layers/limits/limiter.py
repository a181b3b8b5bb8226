"""Per-tenant limits: a token bucket for rate, a counter for concurrency, a circuit breaker for the
upstream. One tenant's limits never touch another's; a limited request gets 429 (or 503 while the
tenant's upstream circuit is open) with Retry-After, and makes no upstream call."""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from dataclasses import dataclass, field

import structlog

from proxy.config import LimitsConfig
from proxy.layers.limits.work import LoopShare, WorkBudget
from proxy.protocol.errors import TooManyRequests, UpstreamUnavailable

log = structlog.get_logger("proxy.limits")


@dataclass
class TokenBucket:
    rate: float
    capacity: float
    tokens: float = 0.0
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = self.capacity

    def take(self, now: float, count: float = 1.0) -> float:
        """0 when `count` tokens were taken, else the seconds until they will be there."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= count:
            self.tokens -= count
            return 0.0
        return (count - self.tokens) / self.rate


@dataclass
class CircuitBreaker:
    """Closed until `threshold` consecutive failures; then open (fail fast) for `open_seconds`;
    then one trial request decides: success closes it, failure opens it again.

    A timeout or an HTTP 500 answer is a fault a caller can cause with its own arguments (a call's
    length follows them; a tool may fail with a 500 on some input): such faults alone open the
    circuit only when requests of at least two principals met them, so one user cannot shut the
    tenant's other users out. Any other fault (unreachable, 502-504, a malformed answer, a crashed
    child) counts as before."""

    threshold: int
    open_seconds: float
    failures: int = 0
    opened_at: float | None = None
    trial_running: bool = False
    faults: int = 0  # failures of the current run no caller's arguments could have caused
    caused_by: str | None = None  # the first principal whose request met a timeout or a 5xx
    several_caused: bool = False  # and another principal's did too

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def admit(self, now: float) -> float:
        """0 when a request may go upstream, else the seconds until the circuit half-opens."""
        if self.opened_at is None:
            return 0.0
        remaining = self.opened_at + self.open_seconds - now
        if remaining > 0:
            return remaining
        if self.trial_running:
            return 1.0
        self.trial_running = True
        return 0.0

    def abandon(self) -> None:
        """A trial request ended without an upstream verdict (client gone): let another try."""
        self.trial_running = False

    def record(self, success: bool, now: float, caused_by: str | None = None) -> None:
        """How an upstream call went; `caused_by`: the principal whose request met a fault its
        arguments could have caused (a timeout, a 500), if it did."""
        if success:
            self.failures, self.opened_at, self.trial_running = 0, None, False
            self.faults, self.caused_by, self.several_caused = 0, None, False
            return
        self.failures += 1
        self.trial_running = False
        if caused_by is None:
            self.faults += 1
        elif self.caused_by is None:
            self.caused_by = caused_by
        elif caused_by != self.caused_by:
            self.several_caused = True
        decisive = self.faults > 0 or self.several_caused
        if self.threshold and ((self.failures >= self.threshold and decisive) or self.opened_at is not None):
            self.opened_at = now


class TenantLimits:
    def __init__(self, settings: LimitsConfig) -> None:
        self.settings = settings
        rate = settings.requests_per_second
        self.bucket = TokenBucket(rate, float(settings.burst or max(1, math.ceil(rate)))) if rate else None
        self.in_flight = 0
        self.bytes_in_flight = 0
        self.streams = 0
        self.held = 0  # refusals held back before they are answered (stage.py)
        self.work = WorkBudget(settings.work_share) if settings.work_share else None
        byte_rate = settings.bytes_per_second
        self.byte_bucket = TokenBucket(byte_rate, max(byte_rate, 1.0)) if byte_rate else None
        self.breaker = CircuitBreaker(settings.circuit_failures, settings.circuit_open_seconds)

    def admit_upstream(self) -> bool:
        """Checked where the upstream call is made (after policy and cache, which answer locally):
        refuse it while the tenant's circuit is open. True when this call is the half-open trial."""
        if not self.settings.circuit_failures:
            return False
        trial = self.breaker.is_open
        wait = self.breaker.admit(time.monotonic())
        if wait:
            raise UpstreamUnavailable(
                "The upstream MCP server is failing; requests are refused for a while (circuit open)",
                data={"limit": "circuit"},
                headers={"Retry-After": str(math.ceil(wait))},
            )
        return trial

    def admit(self, body_bytes: int = 0) -> None:
        """Take a slot for one request and its body, or refuse it (no upstream call, body unread)."""
        now = time.monotonic()
        if self.bucket is not None:
            wait = self.bucket.take(now)
            if wait:
                raise TooManyRequests(
                    "Too many requests: this tenant is over its request rate",
                    data={"limit": "rate"},
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
        if self.settings.max_concurrent and self.in_flight >= self.settings.max_concurrent:
            raise TooManyRequests(
                "Too many requests: this tenant has too many requests in flight",
                data={"limit": "concurrency"},
                headers={"Retry-After": "1"},
            )
        self.admit_bytes(body_bytes, now)
        self.in_flight += 1

    def admit_bytes(self, body_bytes: int, now: float | None = None) -> None:
        """Charge a request body to the tenant's bytes in flight (and bytes per second)."""
        settings = self.settings
        if settings.max_bytes_in_flight and self.bytes_in_flight + body_bytes > settings.max_bytes_in_flight:
            raise TooManyRequests(
                "Too many requests: this tenant has too many request bytes in flight",
                data={"limit": "bytes"},
                headers={"Retry-After": "1"},
            )
        if self.byte_bucket is not None and body_bytes:
            moment = time.monotonic() if now is None else now
            wait = self.byte_bucket.take(moment, min(body_bytes, self.byte_bucket.capacity))
            if wait:
                raise TooManyRequests(
                    "Too many requests: this tenant is over its request bytes per second",
                    data={"limit": "bytes_per_second"},
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
        self.bytes_in_flight += body_bytes

    def release(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)

    def release_bytes(self, body_bytes: int) -> None:
        self.bytes_in_flight = max(0, self.bytes_in_flight - body_bytes)

    def open_stream(self) -> None:
        """A long-lived stream (GET, subscriptions/listen) opens, or is refused (429)."""
        if self.settings.max_streams and self.streams >= self.settings.max_streams:
            raise TooManyRequests(
                "Too many requests: this tenant has too many open streams",
                data={"limit": "streams"},
                headers={"Retry-After": "5"},
            )
        self.streams += 1

    def close_stream(self) -> None:
        self.streams = max(0, self.streams - 1)


@dataclass
class Admission:
    """One request's place under its tenant's limits, given back when the request ends."""

    limits: TenantLimits  # this process's view: its circuit breaker decides upstream calls
    body_bytes: int = 0  # the request body's bytes, charged to the tenant's bytes in flight
    local_slot: bool = False  # holds a place in this process's concurrency counter
    shared_slot: str | None = None  # holds a place in the shared (Redis) concurrency set


class RefusalLog:
    """Requests refused by a tenant's limits are logged as counts: one line per tenant and limit
    for each second with refusals (every refusal still has its audit record and metrics), so a
    tenant flooding with refused requests costs the log, and the proxy, next to nothing."""

    def __init__(self, seconds: float = 1.0) -> None:
        self.seconds = seconds
        self._counts: dict[tuple[str, str], int] = {}
        self._timer: asyncio.TimerHandle | None = None

    def note(self, tenant: str, limit: str) -> None:
        key = (tenant, limit)
        self._counts[key] = self._counts.get(key, 0) + 1
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(
                self.seconds, self.flush, context=contextvars.Context()
            )

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        counts, self._counts = self._counts, {}
        for (tenant, limit), refused in counts.items():
            log.info("limited", tenant=tenant, limit=limit, refused=refused, seconds=self.seconds)


class LocalLimiter:
    """Every tenant's limits in this process (the Limiter of one process, and each replica's
    fallback and circuit view with Redis); a tenant's state survives a reload unless its settings
    changed."""

    def __init__(self) -> None:
        self._tenants: dict[str, TenantLimits] = {}
        self.refusals = RefusalLog()
        self.loop_share = LoopShare()

    async def admit(self, tenant: str, settings: LimitsConfig, body_bytes: int = 0) -> Admission:
        """A place for one request of `tenant` (and its body), or TooManyRequests (no upstream call)."""
        limits = self.of(tenant, settings)
        limits.admit(body_bytes)
        return Admission(limits, body_bytes, local_slot=True)

    def release(self, tenant: str, admission: Admission) -> None:
        if admission.local_slot:
            admission.limits.release()
            admission.local_slot = False
        if admission.body_bytes:
            admission.limits.release_bytes(admission.body_bytes)
            admission.body_bytes = 0

    def of(self, tenant: str, settings: LimitsConfig) -> TenantLimits:
        limits = self._tenants.get(tenant)
        # Identity first: the same config object on every request; a model compare costs more.
        if limits is None or (limits.settings is not settings and limits.settings != settings):
            limits = TenantLimits(settings)
            self._tenants[tenant] = limits
        return limits

    def forget(self, tenant: str) -> None:
        self._tenants.pop(tenant, None)

    def circuit_open(self, tenant: str) -> bool:
        limits = self._tenants.get(tenant)
        return limits is not None and limits.breaker.is_open
