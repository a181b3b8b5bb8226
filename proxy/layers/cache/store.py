"""Layer 2: an in-process response cache whose every key starts with the tenant.

    key = (tenant, principal or None, upstream identity, protocol version, method, name or uri,
           sha256 of the canonical params)

A tuple, never a joined string, so no tenant id (`a:b`) can forge another's key. The canonical
params sort keys, fix separators and keep types apart (1, 1.0 and true never collide); `_meta`
entries that cannot change the result (progress token, client info, log level) are left out.
Bounded by total bytes (cachetools TLRUCache: per-entry expiry, then least recently used).
Concurrent identical misses share one upstream call (single flight), never across tenants.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from cachetools import TLRUCache

from proxy.types import JsonObject

CacheKey = tuple[str, str | None, str, str, str, str, str]
ENTRY_OVERHEAD_BYTES: Final = 200  # a key tuple and its bookkeeping, counted against max_bytes
VOLATILE_META: Final = frozenset(
    {"progressToken", "io.modelcontextprotocol/clientInfo", "io.modelcontextprotocol/logLevel"}
)
# Modern-era methods whose results carry ttlMs / cacheScope (SEP-2549).
HINTED_METHODS: Final = frozenset(
    {
        "tools/list",
        "prompts/list",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "server/discover",
    }
)
LIST_CHANGED: Final = {
    "notifications/tools/list_changed": ("tools/list",),
    "notifications/prompts/list_changed": ("prompts/list",),
    "notifications/resources/list_changed": ("resources/list", "resources/templates/list"),
}


def params_digest(params: JsonObject) -> str:
    """sha256 of the canonical form of params, without the _meta entries that never change a result."""
    meta = params.get("_meta")
    if isinstance(meta, dict) and VOLATILE_META & meta.keys():
        params = {**params, "_meta": {k: v for k, v in meta.items() if k not in VOLATILE_META}}
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


@dataclass(frozen=True, slots=True)
class StoredResult:
    result: bytes  # the serialised JSON-RPC result object, exactly as the tenant was sent it
    ttl_seconds: float


class SingleFlight:
    """Concurrent identical misses share one upstream call (per process: a flight never spans
    replicas, and a key always holds its tenant, so tenants never share one)."""

    def __init__(self) -> None:
        self._in_flight: dict[CacheKey, asyncio.Future[bytes | None]] = {}

    def join(self, key: CacheKey) -> asyncio.Future[bytes | None] | None:
        """A leader's pending result to wait for, or None: then the caller leads and must `settle`."""
        pending = self._in_flight.get(key)
        if pending is not None:
            return pending
        self._in_flight[key] = asyncio.get_running_loop().create_future()
        return None

    def settle(self, key: CacheKey, result: bytes | None) -> None:
        """The leader's outcome: the stored result for its followers, or None (they go upstream)."""
        pending = self._in_flight.pop(key, None)
        if pending is not None and not pending.done():
            pending.set_result(result)


class ResponseCache(SingleFlight):
    """The in-process cache (the default backend).

    `fetch`, `put` and `invalidate` are what the proxy calls; the shared (Redis) cache has the same
    three, with `put` and `invalidate` finishing in the background."""

    def __init__(self, max_bytes: int, max_entry_bytes: int) -> None:
        super().__init__()
        self.max_entry_bytes = max_entry_bytes
        self._store: TLRUCache[CacheKey, StoredResult] = TLRUCache(
            maxsize=max(max_bytes, 1),
            ttu=lambda _key, entry, now: now + entry.ttl_seconds,
            getsizeof=lambda entry: len(entry.result) + ENTRY_OVERHEAD_BYTES,
        )

    @property
    def size_bytes(self) -> int:
        return int(self._store.currsize)

    def __len__(self) -> int:
        return len(self._store)

    def get(self, key: CacheKey) -> bytes | None:
        entry = self._store.get(key)
        return entry.result if entry is not None else None

    async def fetch(self, key: CacheKey) -> bytes | None:
        return self.get(key)

    def put(self, key: CacheKey, result: bytes, ttl_seconds: float) -> bool:
        """Store a result; too large, too short-lived or too big for the cache: not stored."""
        size = len(result) + ENTRY_OVERHEAD_BYTES
        if ttl_seconds <= 0 or len(result) > self.max_entry_bytes or size > self._store.maxsize:
            return False
        self._store[key] = StoredResult(result, ttl_seconds)
        return True

    def invalidate(self, tenant: str, methods: Iterable[str] | None = None, name: str | None = None) -> int:
        """Drop a tenant's entries (of these methods, of this name); returns how many went."""
        wanted = frozenset(methods) if methods is not None else None
        doomed = [
            key
            for key in list(self._store.keys())
            if key[0] == tenant and (wanted is None or key[4] in wanted) and (name is None or key[5] == name)
        ]
        for key in doomed:
            self._store.pop(key, None)
        return len(doomed)


def hinted_ttl(result: Any) -> tuple[float, bool] | None:
    """(ttl seconds, private) from a result's ttlMs / cacheScope, or None when it may not be cached."""
    if not isinstance(result, dict):
        return None
    ttl_ms = result.get("ttlMs")
    if not isinstance(ttl_ms, int | float) or isinstance(ttl_ms, bool) or ttl_ms <= 0:
        return None
    return ttl_ms / 1000.0, result.get("cacheScope") != "public"


# --- the pipeline's view ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CachePlan:
    """How one request may be answered from, and stored into, the cache."""

    tenant: str
    subject: str  # the principal private entries belong to (issuer and subject)
    upstream: str
    version: str
    method: str
    name: str
    digest: str
    tool_ttl_seconds: float | None  # tools/call: the policy's TTL, per tenant; None: the upstream's hints

    def key(self, principal: str | None) -> CacheKey:
        return (self.tenant, principal, self.upstream, self.version, self.method, self.name, self.digest)

    @property
    def lookup_keys(self) -> tuple[CacheKey, ...]:
        if self.tool_ttl_seconds is not None:
            return (self.key(None),)
        return (self.key(None), self.key(self.subject))

    @property
    def flight_key(self) -> CacheKey:
        # A hinted result may turn out private: only the same subject may share its flight.
        return self.key(None if self.tool_ttl_seconds is not None else self.subject)

    def store_key_and_ttl(self, result: JsonObject) -> tuple[CacheKey, float] | None:
        if result.get("isError") is True or result.get("resultType") in ("input_required", "task"):
            return None
        if "task" in result:  # a 2025-11-25 task handle: its id is its caller's alone
            return None
        if self.tool_ttl_seconds is not None:
            return self.key(None), self.tool_ttl_seconds
        hint = hinted_ttl(result)
        if hint is None:
            return None
        ttl, private = hint
        return self.key(self.subject if private else None), ttl


def plan_for(
    tenant: str,
    subject: str,
    upstream: str,
    version: str,
    modern: bool,
    method: str,
    params: JsonObject,
    tool_ttls: Mapping[str, float] | None,
) -> CachePlan | None:
    """The cache plan for a request, or None when it must bypass the cache."""
    if "requestState" in params or "inputResponses" in params:
        return None  # a multi-round-trip retry: its answer belongs to that exchange alone
    if not modern and "task" in params:
        return None  # a task-augmented request (2025-11-25) is answered with its own task
    name = params.get("name") if method != "resources/read" else params.get("uri")
    if method == "tools/call":
        ttl = (tool_ttls or {}).get(name) if isinstance(name, str) else None
        if ttl is None:
            return None
    elif modern and method in HINTED_METHODS:
        ttl = None
    else:
        return None
    return CachePlan(
        tenant,
        subject,
        upstream,
        version,
        method,
        name if isinstance(name, str) else "",
        params_digest(params),
        ttl,
    )
