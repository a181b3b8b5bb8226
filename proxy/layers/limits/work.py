"""Event-loop time, accounted to the tenant whose request spent it.

Every tenant of a replica shares one event loop: while one request's synchronous work runs
(reading, checking and parsing its body, the policy walk, serialisation), no other request moves.
Bounds on bodies keep each request's work finite, but a tenant that keeps heavy requests in flight
could still take most of the loop. So each exchange's steps on the loop (the runs between two
waits) are timed (`Metered`), what a step holds the loop beyond an ordinary step is charged to its
tenant's budget (`WorkBudget`, `limits.work_share`), and a tenant in debt is refused before its
next body is read (`LoopShare`), but only while other tenants are being served: a tenant alone on
a replica is never held back. Charging steps, not whole exchanges, charges what blocks the loop:
a long stream relaying many small messages, like any ordinary request, is never charged.
"""

from __future__ import annotations

import gc
import math
import time
from collections import OrderedDict
from collections.abc import Coroutine, Generator
from typing import Any, Generic, TypeVar

from proxy.protocol.errors import TooManyRequests

T = TypeVar("T")

# An ordinary step holds the loop well under a millisecond (the proxy's whole CPU per forwarded
# call is about 0.3 ms): only what a step holds it beyond this is charged.
ORDINARY_SECONDS = 0.002
# How recently another tenant must have been admitted for a tenant's debt to be enforced.
CONTENTION_SECONDS = 10.0
CHARGED_KEPT = 1024  # users remembered per tenant as charged lately (the oldest forgotten first)


class _CollectorTime:
    """CPU time the cyclic garbage collector has spent in this process (gc.callbacks): a collection
    runs inside whichever step allocated last, and it is the whole process's housekeeping, not that
    step's tenant's work, so a step is charged without it."""

    __slots__ = ("_started", "seconds")

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.thread_time()
        else:
            self.seconds += time.thread_time() - self._started


COLLECTOR_TIME = _CollectorTime()
gc.callbacks.append(COLLECTOR_TIME)


class Metered(Generic[T]):
    """Awaits a coroutine, adding up the time each of its steps holds the event loop beyond an
    ordinary step (not the time it waits: that is other requests' time)."""

    __slots__ = ("_coroutine", "seconds")

    def __init__(self, coroutine: Coroutine[Any, Any, T]) -> None:
        self._coroutine = coroutine
        self.seconds = 0.0

    def __await__(self) -> Generator[Any, Any, T]:
        # The thread's CPU time, not the wall clock: a step the OS preempted (other processes on
        # the cores) did not hold the loop for longer in work, and is not charged for it. Reading
        # it is a system call (about 0.5 us), the wall clock is not: a step cannot take more CPU
        # time than wall time, so its CPU time is read at its end only when the wall clock says it
        # may have passed the allowance (an ordinary step is never charged either way).
        coroutine, allowance, collector = self._coroutine, ORDINARY_SECONDS, COLLECTOR_TIME
        send, cpu, wall = coroutine.send, time.thread_time, time.perf_counter
        value: Any = None
        error: BaseException | None = None
        while True:
            began, start, collected = wall(), cpu(), collector.seconds
            try:
                yielded = send(value) if error is None else coroutine.throw(error)
            except StopIteration as done:
                if wall() - began > allowance:
                    self._add(cpu() - start - (collector.seconds - collected), allowance)
                return done.value  # type: ignore[no-any-return]
            except BaseException:
                if wall() - began > allowance:
                    self._add(cpu() - start - (collector.seconds - collected), allowance)
                raise
            if wall() - began > allowance:
                self._add(cpu() - start - (collector.seconds - collected), allowance)
            try:
                value, error = (yield yielded), None
            except GeneratorExit:
                coroutine.close()
                raise
            except BaseException as thrown:  # a cancellation, delivered where the coroutine waits
                value, error = None, thrown

    def _add(self, step: float, allowance: float) -> None:
        if step > allowance:
            self.seconds += step - allowance


class WorkBudget:
    """A token bucket of event-loop seconds: refilled at `share` seconds a second, holding one
    second's worth. Charged after the work is done, so it may go into debt (by at most what the
    tenant's requests in flight cost); while in debt the tenant's requests may be refused."""

    __slots__ = ("_charged", "capacity", "share", "tokens", "updated")

    def __init__(self, share: float) -> None:
        self.share = share
        self.capacity = share
        self.tokens = share
        self.updated = time.monotonic()
        # Who was charged lately (principal -> when), newest last, bounded: a tenant in debt is held
        # back only in the users whose requests made it, never in a colleague whose requests are
        # ordinary.
        self._charged: OrderedDict[str, float] = OrderedDict()

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.share)
        self.updated = now

    def charge(self, seconds: float, now: float, principal: str = "") -> None:
        self._refill(now)
        self.tokens -= seconds
        self._charged[principal] = now
        self._charged.move_to_end(principal)
        if len(self._charged) > CHARGED_KEPT:
            self._charged.popitem(last=False)

    def charged_lately(self, principal: str, now: float) -> bool:
        """Whether this user's requests were charged within CONTENTION_SECONDS."""
        charged = self._charged.get(principal)
        return charged is not None and charged > now - CONTENTION_SECONDS

    def debt_seconds(self, now: float) -> float:
        """0 when the budget is not in debt, else how long until it is not."""
        if self.tokens >= 0:  # the usual case: no clock arithmetic
            return 0.0
        self._refill(now)
        return 0.0 if self.tokens >= 0 else -self.tokens / self.share


class LoopShare:
    """This process's view of who is using the loop: the two most recently admitted tenants (enough
    to answer "was another tenant served lately?" in constant time, with any number of tenants)."""

    __slots__ = ("_latest", "_latest_at", "_other_at")

    def __init__(self) -> None:
        self._latest: str | None = None
        self._latest_at = -math.inf
        self._other_at = -math.inf  # when a tenant other than the latest one was last admitted

    def admit(self, tenant: str, budget: WorkBudget | None, principal: str = "") -> None:
        """Note the tenant's request; refuse it (429, before its body is read) when its budget is
        in debt while another tenant is being served, and the caller is one whose requests were
        charged lately (a colleague whose requests are ordinary is never held back for them)."""
        now = time.monotonic()
        # (Contention first: a tenant alone may be in debt on every request, and is never refused.)
        if (
            budget is not None
            and budget.tokens < 0
            and self._other_seen_at(tenant) > now - CONTENTION_SECONDS
        ):
            wait = budget.debt_seconds(now)
            if wait and budget.charged_lately(principal, now):
                raise TooManyRequests(
                    "Too many requests: this tenant's requests took more than its share of the proxy's time",
                    data={"limit": "work"},
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
        if tenant != self._latest:
            self._other_at, self._latest = self._latest_at, tenant
        self._latest_at = now

    def _other_seen_at(self, tenant: str) -> float:
        return self._latest_at if tenant != self._latest else self._other_at


def charge(budget: WorkBudget | None, seconds: float, principal: str = "") -> None:
    """Charge what an exchange's steps held the loop beyond ordinary ones to its tenant's budget,
    in the name of the user whose request it was."""
    if budget is not None and seconds > 0:
        budget.charge(seconds, time.monotonic(), principal)
