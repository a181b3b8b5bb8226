"""Per-tenant rate and concurrency limits held in Redis, atomic across replicas (one Lua script).

    <prefix>:{<tenant>}:ratelimit   hash: tokens, ts (a token bucket on Redis's own clock)
    <prefix>:{<tenant>}:inflight    sorted set: one member per request in flight, by start time; a
                                    member older than STALE_SECONDS (a replica died) no longer counts

Both keys carry the tenant's hash tag, so on a Redis Cluster the script's two keys share a slot.

The circuit breaker stays per replica: it judges this replica's path to the upstream. Redis
unreachable: each replica falls back to its own counters, so the limits still hold per replica.
"""

from __future__ import annotations

import math
import secrets

from proxy.backends.redis.client import RedisState, StateUnavailable
from proxy.config import LimitsConfig
from proxy.layers.limits.limiter import Admission, LocalLimiter, TenantLimits
from proxy.protocol.errors import TooManyRequests

STALE_SECONDS = 600
MAX_OWED_SLOTS = 1024  # per tenant

_ADMIT = """
for i = 6, #ARGV do redis.call('ZREM', KEYS[2], ARGV[i]) end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
if rate > 0 then
  local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
  local tokens = tonumber(bucket[1]) or capacity
  local since = tonumber(bucket[2]) or now
  tokens = math.min(capacity, tokens + math.max(0, now - since) * rate)
  local keep = math.ceil(capacity / rate * 1000) + 1000
  if tokens < 1 then
    redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
    redis.call('PEXPIRE', KEYS[1], keep)
    return {1, tostring((1 - tokens) / rate)}
  end
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[1], keep)
end
local most = tonumber(ARGV[3])
if most > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[5]))
  if redis.call('ZCARD', KEYS[2]) >= most then
    if rate > 0 then redis.call('HINCRBYFLOAT', KEYS[1], 'tokens', 1) end
    return {2, '1'}
  end
  redis.call('ZADD', KEYS[2], now, ARGV[4])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[5]))
end
return {0, '0'}
"""


class RedisLimiter:
    """The Limiter (layers/limits/backend.py) across replicas: one Lua script on Redis's clock per
    admission; this replica's LocalLimiter keeps the circuit view and stands in while Redis is away."""

    def __init__(self, state: RedisState) -> None:
        self.local = LocalLimiter()
        self.refusals = self.local.refusals
        self.loop_share = self.local.loop_share  # event-loop time is this replica's own
        self.state = state
        self._admit = state.client.register_script(_ADMIT)
        # Slots whose release did not reach Redis (it stalled): given back with the tenant's next
        # admission, so a stall cannot hold a tenant's concurrency for STALE_SECONDS.
        self._owed: dict[str, set[str]] = {}

    async def admit(self, tenant: str, settings: LimitsConfig, body_bytes: int = 0) -> Admission:
        limits = self.local.of(tenant, settings)
        rate, most = settings.requests_per_second, settings.max_concurrent
        if not rate and not most:
            return await self.local.admit(tenant, settings, body_bytes)  # bytes: this replica's
        slot = secrets.token_hex(8) if most else None
        capacity = settings.burst or max(1, math.ceil(rate))
        keys = [self.state.key(tenant, "ratelimit"), self.state.key(tenant, "inflight")]
        owed = self._owed.pop(tenant, set())
        args = [rate, capacity, most, slot or "", STALE_SECONDS, *sorted(owed)]
        try:
            verdict, wait = await self.state.call("limit_admit", self._admit(keys=keys, args=args))
        except StateUnavailable:
            self._owe(tenant, owed)
            return await self.local.admit(tenant, settings, body_bytes)  # this replica's own meanwhile
        if verdict == 1:
            raise TooManyRequests(
                "Too many requests: this tenant is over its request rate",
                data={"limit": "rate"},
                headers={"Retry-After": str(max(1, math.ceil(float(wait))))},
            )
        if verdict == 2:
            raise TooManyRequests(
                "Too many requests: this tenant has too many requests in flight",
                data={"limit": "concurrency"},
                headers={"Retry-After": "1"},
            )
        admission = Admission(limits, shared_slot=slot)
        try:  # bytes in flight are charged in this replica (the body is read here)
            limits.admit_bytes(body_bytes)
        except TooManyRequests:
            self.release(tenant, admission)
            raise
        admission.body_bytes = body_bytes
        return admission

    def of(self, tenant: str, settings: LimitsConfig) -> TenantLimits:
        return self.local.of(tenant, settings)

    def forget(self, tenant: str) -> None:
        self.local.forget(tenant)

    def circuit_open(self, tenant: str) -> bool:
        return self.local.circuit_open(tenant)

    def release(self, tenant: str, admission: Admission) -> None:
        self.local.release(tenant, admission)
        if admission.shared_slot is not None:
            inflight, slot = self.state.key(tenant, "inflight"), admission.shared_slot
            self.state.defer(
                lambda pipeline: pipeline.zrem(inflight, slot), lambda: self._owe(tenant, {slot})
            )
            admission.shared_slot = None

    def _owe(self, tenant: str, slots: set[str]) -> None:
        if slots:
            owed = self._owed.setdefault(tenant, set())
            owed.update(slots)
            while len(owed) > MAX_OWED_SLOTS:  # bounded: beyond it, STALE_SECONDS frees them
                owed.pop()
