"""What the audit trail needs of a shared backend: an `AuditSink` receives each batch of summaries
(written in the background) and can read a tenant's latest records back across replicas.
`backends/redis/audit.py` keeps them in one Redis stream per tenant. Files per tenant and the
in-memory records of this replica are the audit log's own (audit.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from proxy.types import JsonObject

if TYPE_CHECKING:
    from proxy.layers.containment.audit import AuditRecord


class AuditSink(Protocol):
    def write(self, batch: list[AuditRecord]) -> None:
        """Take a batch of summaries (in the background: no request waits for it)."""
        ...

    async def recent(self, tenant: str, limit: int) -> list[JsonObject] | None:
        """The tenant's latest records, newest first; None when they cannot be read now."""
        ...
