"""The response cache in Redis, shared by every replica, each tenant within its own byte budget.

    <prefix>:{<tenant>}:cache:<digest>   the result bytes exactly as in process, with a PX expiry
    <prefix>:{<tenant>}:cache-index      digest -> [method, name], for invalidation
    <prefix>:{<tenant>}:cache-age        sorted set: digest by the time it was stored (oldest go first)
    <prefix>:{<tenant>}:cache-expiry     sorted set: digest by expiry (stale bookkeeping is dropped)
    <prefix>:{<tenant>}:cache-sizes      hash: digest -> bytes, and `total`: the tenant's bytes

A store is one Lua script on Redis's clock, atomic across replicas: it drops the tenant's expired
entries, then its oldest ones until the new one fits the tenant's budget; it never touches another
tenant's keys. (Redis itself must not evict across tenants either: `maxmemory-policy noeviction`.)
The digest is the sha256 of the whole key tuple as a JSON array (tenant and principal included),
so the tenant appears both in the Redis key's fixed position and inside what was hashed.
Unreachable Redis: a lookup is a miss (the upstream answers), a store or invalidation is dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Iterable
from typing import Any

from proxy.backends.redis.client import RedisState, StateUnavailable
from proxy.layers.cache.store import ENTRY_OVERHEAD_BYTES, CacheKey, SingleFlight

# KEYS: 1 the entry's data key, 2 index, 3 age, 4 expiry, 5 sizes; ARGV[1]: the data keys' prefix.
_FORGET = """
local function forget(digest)
  local size = tonumber(redis.call('HGET', KEYS[5], digest) or '0')
  if size ~= 0 then
    redis.call('HDEL', KEYS[5], digest)
    redis.call('HINCRBY', KEYS[5], 'total', -size)
  end
  redis.call('ZREM', KEYS[3], digest)
  redis.call('ZREM', KEYS[4], digest)
  redis.call('HDEL', KEYS[2], digest)
  redis.call('DEL', ARGV[1] .. digest)
end
"""
# ARGV: 2 digest, 3 result, 4 ttl ms, 5 size, 6 budget, 7 [method, name]
_PUT = (
    _FORGET
    + """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
for _, stale in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)) do forget(stale) end
forget(ARGV[2])
local size, budget, ttl = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[4])
local function total() return tonumber(redis.call('HGET', KEYS[5], 'total') or '0') end
while total() + size > budget do
  local oldest = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
  if not oldest then return 0 end
  forget(oldest)
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ttl)
redis.call('HSET', KEYS[2], ARGV[2], ARGV[7])
redis.call('ZADD', KEYS[3], now, ARGV[2])
redis.call('ZADD', KEYS[4], now + ttl, ARGV[2])
redis.call('HSET', KEYS[5], ARGV[2], size)
redis.call('HINCRBY', KEYS[5], 'total', size)
for i = 2, 5 do
  redis.call('PEXPIRE', KEYS[i], ttl, 'NX')
  redis.call('PEXPIRE', KEYS[i], ttl, 'GT')
end
return 1
"""
)
# ARGV[2..]: the digests to drop
_DROP = (
    _FORGET
    + """
for i = 2, #ARGV do forget(ARGV[i]) end
return #ARGV - 1
"""
)


def digest(key: CacheKey) -> str:
    return hashlib.sha256(json.dumps(list(key), separators=(",", ":")).encode()).hexdigest()


class RedisResponseCache(SingleFlight):
    def __init__(self, state: RedisState, max_entry_bytes: int, max_bytes: int) -> None:
        super().__init__()
        self.state = state
        self.max_entry_bytes = max_entry_bytes
        self.max_bytes = max_bytes
        self._put = state.client.register_script(_PUT)
        self._drop = state.client.register_script(_DROP)

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

    def put(self, key: CacheKey, result: bytes, ttl_seconds: float, budget: int | None = None) -> bool:
        size = len(result) + ENTRY_OVERHEAD_BYTES
        budget = self.max_bytes if budget is None else budget
        if ttl_seconds <= 0 or len(result) > self.max_entry_bytes or size > budget:
            return False
        ttl_ms = max(1, int(ttl_seconds * 1000))
        entry = digest(key)
        args = [self._data_key(key, ""), entry, result, ttl_ms, size, budget, json.dumps([key[4], key[5]])]
        self.state.spawn("cache_put", self._put(keys=self._keys(key[0], self._data_key(key)), args=args))
        return True

    def invalidate(self, tenant: str, methods: Iterable[str] | None = None, name: str | None = None) -> int:
        self.state.spawn("cache_invalidate", self._invalidate(tenant, methods, name))
        return 0

    def retire(self, tenant: str) -> None:
        self._next_generation(tenant)
        stores = self.state.writes_in_flight()  # a store spawned before may land after a purge
        self.state.spawn("cache_invalidate", self._after(stores, self._invalidate(tenant, None, None)))

    async def _after(self, stores: set[asyncio.Task[Any]], purge: Awaitable[int]) -> int:
        if stores:
            await asyncio.wait(stores, timeout=self.state.timeout_seconds * 2)
        return await purge

    async def flush(self, tenant: str) -> int:
        """Every entry of the tenant, on every replica, dropped now (StateUnavailable: not done)."""
        return await self.state.call("cache_flush", self._invalidate(tenant, None, None))

    async def _invalidate(self, tenant: str, methods: Iterable[str] | None, name: str | None) -> int:
        wanted = frozenset(methods) if methods is not None else None
        entries = await self.state.client.hgetall(self.state.key(tenant, "cache-index"))
        doomed = []
        for field, value in entries.items():
            method, entry_name = json.loads(value)
            if (wanted is None or method in wanted) and (name is None or entry_name == name):
                doomed.append(field.decode())
        if doomed:
            prefix = self.state.key(tenant, "cache", "")
            await self._drop(keys=self._keys(tenant, prefix), args=[prefix, *doomed])
        return len(doomed)

    def _keys(self, tenant: str, data_key: str) -> list[str]:
        kinds = ("cache-index", "cache-age", "cache-expiry", "cache-sizes")
        return [data_key, *(self.state.key(tenant, kind) for kind in kinds)]

    def _data_key(self, key: CacheKey, entry: str | None = None) -> str:
        return self.state.key(key[0], "cache", digest(key) if entry is None else entry)
