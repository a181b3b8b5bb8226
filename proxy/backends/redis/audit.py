"""The AuditSink (layers/containment/backend.py) in Redis: one stream of summaries per tenant,

    <prefix>:{<tenant>}:audit   stream of records (never contents), trimmed to about audit_max_records

so proxy_recent_activity sees every replica's records of the caller's tenant."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from proxy.backends.redis.client import RedisState, StateUnavailable
from proxy.ops.log import ascii_json
from proxy.types import JsonObject

if TYPE_CHECKING:
    from proxy.layers.containment.audit import AuditRecord


class RedisAuditSink:
    def __init__(self, state: RedisState) -> None:
        self.state = state

    def write(self, batch: list[AuditRecord]) -> None:
        pipeline = self.state.client.pipeline(transaction=False)
        for record in batch:
            line = ascii_json(record.as_dict())
            key = self.state.key(record.tenant, "audit")
            pipeline.xadd(key, {"record": line}, maxlen=self.state.audit_max_records, approximate=True)
        self.state.spawn("audit_append", pipeline.execute())

    async def recent(self, tenant: str, limit: int) -> list[JsonObject] | None:
        await self.state.written()  # this replica's own records are in the stream before the read
        try:
            read = self.state.client.xrevrange(self.state.key(tenant, "audit"), count=limit)
            entries = await self.state.call("audit_recent", read)
        except StateUnavailable:
            return None  # this replica's own records meanwhile
        return [json.loads(fields[b"record"]) for _, fields in entries]
