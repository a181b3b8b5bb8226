"""Whose tasks the upstream's task ids are, shared by the replicas (state.backend: redis).

    <prefix>:{<tenant>}:tasks:<digest of principal and upstream> sorted set: upstream task ids by
                                                                  creation time, the newest 1024,
                                                                  expiring a day after the last one

The proxy's task ids themselves need no store (layers/sessions/task_store.py: they open with the
replicas' common key), so a task created on one replica is found at once on any other. This record
is what a task list is filtered by on any replica; a notification is judged by what this replica
knows (its own tasks, and those a list here loaded). Redis unreachable: this replica's own record.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Final

from proxy.backends.redis.client import RedisState, StateUnavailable
from proxy.layers.sessions.task_store import MAX_TASKS_PER_OWNER, Owner, TaskStore

KEEP_MS: Final = 24 * 3600 * 1000


class RedisTaskStore(TaskStore):
    def __init__(self, state: RedisState) -> None:
        super().__init__()
        self.state = state

    def _key(self, owner: Owner) -> str:
        tenant, subject, upstream = owner
        digest = hashlib.sha256(f"{subject}\0{upstream}".encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return self.state.key(tenant, "tasks", digest)

    def remember(self, owner: Owner, upstream_id: str) -> None:
        super().remember(owner, upstream_id)
        key = self._key(owner)

        def record(pipeline: Any) -> None:
            pipeline.zadd(key, {upstream_id: time.time()})
            pipeline.zremrangebyrank(key, 0, -(MAX_TASKS_PER_OWNER + 1))
            pipeline.pexpire(key, KEEP_MS)

        self.state.defer(record)

    async def owned(self, owner: Owner) -> frozenset[str]:
        local = await super().owned(owner)
        await self.state.written()  # this replica's own records are in Redis before the read
        try:
            found = await self.state.call("task_owned", self.state.client.zrange(self._key(owner), 0, -1))
        except StateUnavailable:
            return local
        shared = frozenset(item.decode("utf-8", "surrogatepass") for item in found)
        for upstream_id in shared - local:
            super().remember(owner, upstream_id)  # now known here too (notifications)
        return shared | local
