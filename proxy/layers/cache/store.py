"""Layer 2: an in-process response cache whose every key starts with the tenant.

    key = (tenant, principal or None, upstream identity, protocol version, method, name or uri,
           sha256 of the canonical params)

A tuple, never a joined string, so no tenant id (`a:b`) can forge another's key. The canonical
params sort keys, fix separators and keep types apart (1, 1.0 and true never collide); `_meta`
entries that cannot change the result (progress token, client info, log level) are left out.
Bounded by bytes per tenant (each tenant's own budget; storing evicts only the storing tenant's
entries: cachetools TLRUCache, per-entry expiry, then least recently used) and in total.
Concurrent identical misses share one upstream call (single flight), never across tenants.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import cachetools
import orjson
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
    """sha256 of the canonical form of params, without the _meta entries that never change a result.

    The canonical form is orjson's with sorted keys (several times the standard library's speed);
    what orjson refuses (integers beyond 64 bits, lone surrogates) is written by the standard
    library, sorted and escaped to ASCII. A value always takes the same one of the two ways, and
    each writes a value only one way, so equal params give equal digests and others do not."""
    meta = params.get("_meta")
    if isinstance(meta, dict) and VOLATILE_META & meta.keys():
        params = {**params, "_meta": {k: v for k, v in meta.items() if k not in VOLATILE_META}}
    try:
        canonical = orjson.dumps(params, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # orjson.JSONEncodeError
        text = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
        canonical = text.encode("ascii")
    return hashlib.sha256(canonical).hexdigest()


@dataclass(frozen=True, slots=True)
class StoredResult:
    result: bytes  # the serialised JSON-RPC result object, exactly as the tenant was sent it
    expires: float  # time.monotonic() when it goes stale

    @property
    def size(self) -> int:
        return len(self.result) + ENTRY_OVERHEAD_BYTES


def tenant_budget(max_bytes: int, max_entry_bytes: int, per_tenant: int | None, tenants: int) -> int:
    """A tenant's own byte budget: as configured, or the global bound shared out among the
    configured tenants, but never less than one entry's worth."""
    if per_tenant is not None:
        return per_tenant
    return max(max_bytes // max(tenants, 1), max_entry_bytes + ENTRY_OVERHEAD_BYTES)


class SingleFlight:
    """Concurrent identical misses share one upstream call (per process: a flight never spans
    replicas, and a key always holds its tenant, so tenants never share one).

    Also each tenant's generation: a reload that removes or changes a tenant starts a new one
    (`retire`), and an answer is stored only under the generation its exchange began in, so a call
    in flight across the reload cannot store the old configuration's result after the purge."""

    def __init__(self) -> None:
        self._in_flight: dict[CacheKey, asyncio.Future[bytes | None]] = {}
        self._generations: dict[str, int] = {}

    def generation(self, tenant: str) -> int:
        return self._generations.get(tenant, 0)

    def _next_generation(self, tenant: str) -> None:
        self._generations[tenant] = self.generation(tenant) + 1

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


def _shelf(budget: int) -> TLRUCache[CacheKey, StoredResult]:
    """One tenant's entries: the expired go first, then the least recently used."""
    return TLRUCache(maxsize=max(budget, 1), ttu=lambda _key, entry, _now: entry.expires,
                     getsizeof=lambda entry: entry.size)  # fmt: skip


class ResponseCache(SingleFlight):
    """The in-process cache (the default backend): a shelf per tenant, each within the tenant's own
    budget, so storing only ever evicts the storing tenant's entries and what one tenant finds
    never depends on what another stored. The global bound stays: a store that would cross it
    evicts the storing tenant's own entries, or is not kept (the tenants' budgets, as by default,
    add up to no more than it: then it never decides anything).

    `fetch`, `put` and `invalidate` are what the proxy calls; the shared (Redis) cache has the same
    three, with `put` and `invalidate` finishing in the background."""

    def __init__(self, max_bytes: int, max_entry_bytes: int) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self._shelves: dict[str, TLRUCache[CacheKey, StoredResult]] = {}
        self._bytes = 0

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return sum(len(shelf) for shelf in self._shelves.values())

    def entries(self, stale: bool = False) -> list[tuple[CacheKey, StoredResult]]:
        """Every entry of every tenant (for tests and inspection); with `stale`, also those expired
        but not evicted yet."""
        if stale:
            return [(key, cachetools.Cache.__getitem__(shelf, key)) for shelf in self._shelves.values()
                    for key in list(cachetools.Cache.__iter__(shelf))]  # fmt: skip
        found = ((key, shelf.get(key)) for shelf in self._shelves.values() for key in list(shelf))
        return [(key, entry) for key, entry in found if entry is not None]

    def tenant_bytes(self, tenant: str) -> int:
        shelf = self._shelves.get(tenant)
        return int(shelf.currsize) if shelf is not None else 0

    def get(self, key: CacheKey) -> bytes | None:
        shelf = self._shelves.get(key[0])
        entry = shelf.get(key) if shelf is not None else None
        return entry.result if entry is not None else None

    async def fetch(self, key: CacheKey) -> bytes | None:
        return self.get(key)

    def put(self, key: CacheKey, result: bytes, ttl_seconds: float, budget: int | None = None) -> bool:
        """Store a result within its tenant's `budget` (None: only the global bound); too large,
        too short-lived, or with no room left by the tenant's own entries: not stored."""
        entry = StoredResult(result, time.monotonic() + ttl_seconds)
        budget = self.max_bytes if budget is None else budget
        if ttl_seconds <= 0 or len(result) > self.max_entry_bytes or entry.size > min(budget, self.max_bytes):
            return False
        shelf = self._shelf_of(key[0], budget)
        others = self._bytes - int(shelf.currsize)  # every other tenant's bytes: never touched here
        shelf.pop(key, None)
        shelf.expire()
        while others + int(shelf.currsize) + entry.size > self.max_bytes and len(shelf):
            shelf.popitem()  # the global bound: only ever the storing tenant's own entries go
        stored = others + int(shelf.currsize) + entry.size <= self.max_bytes
        if stored:
            shelf[key] = entry  # evicts within the tenant's budget
        self._bytes = others + int(shelf.currsize)
        return stored

    def _shelf_of(self, tenant: str, budget: int) -> TLRUCache[CacheKey, StoredResult]:
        shelf = self._shelves.get(tenant)
        if shelf is None:
            shelf = self._shelves[tenant] = _shelf(budget)
        elif shelf.maxsize != max(budget, 1):  # the budget changed (a reload): keep what still fits
            moved = _shelf(budget)
            for key in list(shelf):  # least recently used first
                entry = shelf[key]
                if entry.size <= moved.maxsize:
                    moved[key] = entry
            self._bytes += int(moved.currsize) - int(shelf.currsize)
            shelf = self._shelves[tenant] = moved
        return shelf

    def invalidate(self, tenant: str, methods: Iterable[str] | None = None, name: str | None = None) -> int:
        """Drop a tenant's entries (of these methods, of this name); returns how many went."""
        shelf = self._shelves.get(tenant)
        if shelf is None:
            return 0
        wanted = frozenset(methods) if methods is not None else None
        before = int(shelf.currsize)
        doomed = [
            key
            for key in list(shelf)
            if (wanted is None or key[4] in wanted) and (name is None or key[5] == name)
        ]
        for key in doomed:
            shelf.pop(key, None)
        self._bytes += int(shelf.currsize) - before
        return len(doomed)

    async def flush(self, tenant: str) -> int:
        return self.invalidate(tenant)

    def retire(self, tenant: str) -> None:
        """The tenant was removed or changed by a reload: a new generation, its entries gone."""
        self._next_generation(tenant)
        self.invalidate(tenant)


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
