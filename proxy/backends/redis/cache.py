"""The response cache in Redis, shared by every replica.

    <prefix>:{<tenant>}:cache:<digest>   the result bytes exactly as in process, with a PX expiry
    <prefix>:{<tenant>}:cache-index      digest -> [method, name], for invalidation

The digest is the sha256 of the whole key tuple as a JSON array (tenant and principal included),
so the tenant appears both in the Redis key's fixed position and inside what was hashed.
Unreachable Redis: a lookup is a miss (the upstream answers), a store or invalidation is dropped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from proxy.backends.redis.client import RedisState, StateUnavailable
from proxy.layers.cache.store import CacheKey, SingleFlight


def digest(key: CacheKey) -> str:
    return hashlib.sha256(json.dumps(list(key), separators=(",", ":")).encode()).hexdigest()


class RedisResponseCache(SingleFlight):
    def __init__(self, state: RedisState, max_entry_bytes: int) -> None:
        super().__init__()
        self.state = state
        self.max_entry_bytes = max_entry_bytes

    size_bytes = 0  # kept by Redis, not by this process

    def __len__(self) -> int:
        return 0

    async def fetch(self, key: CacheKey) -> bytes | None:
        try:
            value: bytes | None = await self.state.call(
                "cache_get", self.state.client.get(self._data_key(key))
            )
        except StateUnavailable:
            return None
        return value

    def put(self, key: CacheKey, result: bytes, ttl_seconds: float) -> bool:
        if ttl_seconds <= 0 or len(result) > self.max_entry_bytes:
            return False
        ttl_ms = max(1, int(ttl_seconds * 1000))
        index, data, entry = self.state.key(key[0], "cache-index"), self._data_key(key), digest(key)
        names = json.dumps([key[4], key[5]])

        def store(pipeline: Any) -> None:
            pipeline.set(data, result, px=ttl_ms)
            pipeline.hset(index, entry, names)
            pipeline.pexpire(index, ttl_ms, nx=True)
            pipeline.pexpire(index, ttl_ms, gt=True)

        self.state.defer(store)
        return True

    def invalidate(self, tenant: str, methods: Iterable[str] | None = None, name: str | None = None) -> int:
        self.state.spawn("cache_invalidate", self._invalidate(tenant, methods, name))
        return 0

    async def _invalidate(self, tenant: str, methods: Iterable[str] | None, name: str | None) -> None:
        wanted = frozenset(methods) if methods is not None else None
        index = self.state.key(tenant, "cache-index")
        entries = await self.state.client.hgetall(index)
        doomed = []
        for field, value in entries.items():
            method, entry_name = json.loads(value)
            if (wanted is None or method in wanted) and (name is None or entry_name == name):
                doomed.append(field.decode())
        if not doomed:
            return
        pipeline = self.state.client.pipeline(transaction=False)
        pipeline.delete(*(self.state.key(tenant, "cache", field) for field in doomed))
        pipeline.hdel(index, *doomed)
        await pipeline.execute()

    def _data_key(self, key: CacheKey) -> str:
        return self.state.key(key[0], "cache", digest(key))
