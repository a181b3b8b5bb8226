"""Type aliases and the small frozen values that travel through the pipeline."""

from __future__ import annotations

import enum
import hashlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from aiohttp import web

    from proxy.layers.cache.store import CacheKey, CachePlan
    from proxy.layers.data_access.catalog import Entry
    from proxy.layers.limits.limiter import Admission
    from proxy.layers.sessions.registry import Session
    from proxy.protocol.jsonrpc import Message
    from proxy.runtime import Runtime, Services, TenantRuntime

JsonObject: TypeAlias = dict[str, Any]
RequestId: TypeAlias = str | int

MODERN_VERSIONS: frozenset[str] = frozenset({"2026-07-28"})
HANDSHAKE_VERSIONS: frozenset[str] = frozenset({"2025-03-26", "2025-06-18", "2025-11-25"})
DEFAULT_HANDSHAKE_VERSION = "2025-03-26"
LATEST_MODERN_VERSION = "2026-07-28"


class Era(enum.Enum):
    """Which MCP protocol era a request belongs to."""

    MODERN = "modern"  # 2026-07-28: one stateless POST per request
    HANDSHAKE = "handshake"  # 2025-03-26 .. 2025-11-25: initialize, Mcp-Session-Id, GET stream


@dataclass(frozen=True, slots=True)
class TenantContext:
    """Who is calling, decided from the verified token alone."""

    tenant: str
    subject: str
    issuer: str
    scopes: frozenset[str]
    expires_at: float


@dataclass(eq=False)
class Exchange:
    """One client request on its way through the pipeline (mitmproxy's flow, for MCP).

    Request stages fill it in order and may end the chain early by setting `reply` (a denial, a
    cache hit) or raising a ProxyError; response hooks see each message coming back; finish hooks
    (audit, metrics) see the outcome.
    """

    request: web.Request
    runtime: Runtime
    services: Services
    started: float = field(default_factory=time.perf_counter)
    ctx: TenantContext | None = None
    tenant: TenantRuntime | None = None
    message: Message | None = None
    era: Era | None = None
    protocol_version: str | None = None
    session: Session | None = None
    # MCP routing headers for the upstream request, rendered from the body the proxy forwards.
    upstream_headers: dict[str, str] = field(default_factory=dict)
    catalog_entry: Entry | None = None  # the tool or prompt the request names, once looked up
    cache_plan: CachePlan | None = None
    cache_flight: CacheKey | None = None  # set while this exchange leads a single flight
    admission: Admission | None = None  # a place under the tenant's limits until the exchange ends
    upstream_seconds: float = 0.0  # time spent waiting for the upstream
    upstream_contacted: bool = False
    session_reservation: str | None = None  # an initialize's place under the session cap
    holds_session: bool = False  # a request in flight on `session` (it is not idle meanwhile)
    status: int = 200
    reply: web.StreamResponse | None = None
    # What happened, for audit and metrics.
    outcome: str = "ok"
    cache_state: str = "bypass"
    error_code: int | None = None
    result_bytes: int = 0
    result_sha256: str | None = None
    ended: float | None = None  # perf_counter when the exchange finished (reports run after)
    ended_at: float | None = None  # the same moment in wall-clock time, for the audit record

    @property
    def request_id(self) -> RequestId | None:
        return self.message.id if self.message is not None else None

    @property
    def duration_seconds(self) -> float:
        return (self.ended if self.ended is not None else time.perf_counter()) - self.started

    def record_result(self, result: bytes) -> None:
        """What the audit keeps of a result: its size and hash, never its content."""
        self.result_bytes = len(result)
        self.result_sha256 = hashlib.sha256(result).hexdigest()

    @property
    def subject_hash(self) -> str | None:
        """The caller as logs may name them: a hash, not the subject claim itself."""
        if self.ctx is None:
            return None
        return hashlib.sha256(f"{self.ctx.tenant}\0{self.ctx.subject}".encode()).hexdigest()[:16]
