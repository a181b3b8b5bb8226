"""What the cache layer needs of a store: `store.ResponseCache` in this process, or
`backends/redis/cache.py` shared by replicas. Both take `store.SingleFlight` for joining identical
misses (a flight never spans replicas: each replica leads its own)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Protocol

from proxy.layers.cache.store import CacheKey


class Cache(Protocol):
    max_entry_bytes: int

    @property
    def size_bytes(self) -> int: ...
    def __len__(self) -> int: ...

    async def fetch(self, key: CacheKey) -> bytes | None:
        """The stored result under `key`, or None (a miss, or the store cannot be reached)."""
        ...

    def put(self, key: CacheKey, result: bytes, ttl_seconds: float, budget: int | None = None) -> bool:
        """Store a result within its tenant's byte `budget` (None: only the global bound); False
        when it is not stored (too large, too short-lived, no room among the tenant's own entries)."""
        ...

    def invalidate(self, tenant: str, methods: Iterable[str] | None = None, name: str | None = None) -> int:
        """Drop a tenant's entries (of these methods, of this name)."""
        ...

    async def flush(self, tenant: str) -> int:
        """Drop every entry of the tenant now (an operator's flush); returns how many went."""
        ...

    def retire(self, tenant: str) -> None:
        """A reload removed or changed the tenant: a new generation begins (answers of exchanges
        begun before it are not stored), and the tenant's entries are dropped once no store of the
        old generation can land after the drop."""
        ...

    def generation(self, tenant: str) -> int:
        """The tenant's generation now (`retire` starts the next one)."""
        ...

    def join(self, key: CacheKey) -> asyncio.Future[bytes | None] | None:
        """A leader's pending result to wait for, or None: the caller leads and must `settle`."""
        ...

    def settle(self, key: CacheKey, result: bytes | None) -> None: ...
