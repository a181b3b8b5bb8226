"""What the limits layer needs of a backend: `LocalLimiter` (limiter.py) keeps every tenant's
limits in this process; `backends/redis/limits.py` shares rate and concurrency across replicas."""

from __future__ import annotations

from typing import Protocol

from proxy.config import LimitsConfig
from proxy.layers.limits.limiter import Admission, RefusalLog, TenantLimits
from proxy.layers.limits.work import LoopShare


class Limiter(Protocol):
    refusals: RefusalLog  # refusals are logged as counts per tenant, limit and second
    loop_share: LoopShare  # who used this replica's event loop lately (work budgets, work.py)

    async def admit(self, tenant: str, settings: LimitsConfig, body_bytes: int = 0) -> Admission:
        """A place for one request of `tenant` and its body (bytes are charged in this replica),
        or TooManyRequests (no upstream call)."""
        ...

    def release(self, tenant: str, admission: Admission) -> None:
        """Give the place back (the exchange ended, however it ended)."""
        ...

    def of(self, tenant: str, settings: LimitsConfig) -> TenantLimits:
        """This process's view of the tenant's limits: its circuit breaker judges this replica's
        path to the upstream."""
        ...

    def forget(self, tenant: str) -> None:
        """The tenant is gone (reload)."""
        ...

    def circuit_open(self, tenant: str) -> bool: ...
