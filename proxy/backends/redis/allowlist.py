"""tenant_allowlist.redis_set: the tenant ids templates may serve, as a Redis set the operator keeps
(`SADD <set> <tenant>` to admit one, `SREM` to close it again). The set's name is used as it is
(no prefix), so provisioning tools can write it without knowing the proxy's key layout."""

from __future__ import annotations

from proxy.backends.redis.client import RedisState, StateUnavailable


class RedisAllowlist:
    def __init__(self, state: RedisState, key: str) -> None:
        self.state = state
        self.key = key

    async def lists(self, tenant: str) -> bool | None:
        """Whether the set holds `tenant`; None when Redis cannot say now."""
        try:
            found = await self.state.call("allowlist", self.state.client.sismember(self.key, tenant))
        except StateUnavailable:
            return None
        return bool(found)
