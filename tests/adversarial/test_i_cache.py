"""THREATS I, the cache: one tenant's traffic cannot evict, or be seen through, another's entries.

Each tenant's upstream serves `blob`, a cacheable tool whose answer is as large as asked and names
how many calls the server has answered (`served`): an answer from the cache repeats an earlier
one. Globex (the attacker) stores far more than its share; acme's (the victim's) entry stays, and
globex's own hits and misses are the same whether or not acme is busy. The same holds in Redis.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
from mcp.server.mcpserver import MCPServer

from proxy.backends.redis.cache import RedisResponseCache
from proxy.backends.redis.client import RedisState
from proxy.config import StateConfig
from proxy.http.keys import SERVICES
from proxy.layers.cache.store import ENTRY_OVERHEAD_BYTES, ResponseCache
from proxy.ops.metrics import Metrics
from tests.adversarial.test_c_cache import call
from tests.conftest import TENANTS, RunningProxy, StartProxy
from tests.redis_server import RedisServer, require_redis_server
from tests.upstreams import Recorder, free_port

pytestmark = pytest.mark.e2e

POLICY = {"tools": {"cache_ttl_seconds": {"blob": 60}}}
MAX_BYTES = 60_000  # 30,000 a tenant by default
BLOB = 2_500  # about 2.6 KB an entry: a dozen fill a tenant's share


def blob_server(tenant: str) -> MCPServer:
    server = MCPServer(f"blob-{tenant}")
    served = {"n": 0}

    @server.tool()
    def blob(key: str, size: int) -> dict[str, Any]:
        """An answer of `size` bytes, numbered: a cached copy repeats its number."""
        served["n"] += 1
        return {"tenant": tenant, "key": key, "served": served["n"], "pad": "x" * size}

    return server


@pytest.fixture(scope="module")
def blob_upstreams(upstream_runner: Any) -> dict[str, str]:
    urls = {}
    for tenant in TENANTS:
        port = free_port()
        upstream_runner.serve(Recorder(blob_server(tenant).streamable_http_app(host="127.0.0.1")), port)
        urls[tenant] = f"http://127.0.0.1:{port}/mcp"
    return urls


async def start(make_proxy: StartProxy, urls: dict[str, str]) -> RunningProxy:
    return await make_proxy(
        urls,
        policies=dict.fromkeys(TENANTS, POLICY),
        cache={"max_bytes": MAX_BYTES, "max_entry_bytes": 10_000},
    )


async def blob(running: RunningProxy, tenant: str, key: str, size: int = BLOB) -> int:
    """The `served` number of the answer (the same as before: it came from the cache)."""
    result = await call(running, tenant, "blob", {"key": key, "size": size})
    assert result["structuredContent"]["tenant"] == tenant
    return int(result["structuredContent"]["served"])


async def test_the_victims_entry_survives_the_attackers_fill(
    make_proxy: StartProxy, blob_upstreams: dict[str, str]
) -> None:
    running = await start(make_proxy, blob_upstreams)
    first = await blob(running, "acme", "report")
    filled = [  # three times the whole cache, let alone its share
        await blob(running, "globex", f"fill-{index}") for index in range(3 * MAX_BYTES // BLOB)
    ]
    assert await blob(running, "acme", "report") == first  # still a hit
    cache = running.app[SERVICES].cache
    assert isinstance(cache, ResponseCache)
    assert cache.tenant_bytes("globex") <= MAX_BYTES // 2
    assert await blob(running, "globex", "fill-0") != filled[0]  # its own oldest went instead


async def attacker_sees(running: RunningProxy, victim_busy: bool) -> list[bool]:
    """Globex's hits (True) and misses, over a pattern that overflows its share; acme meanwhile
    stores as much as it can, or nothing."""
    seen: dict[str, int] = {}
    hits = []
    for step in range(40):
        if victim_busy:
            await blob(running, "acme", f"busy-{step}", size=BLOB + step * 50)
        key = f"k{step * step % 13}"
        served = await blob(running, "globex", key, size=BLOB + len(key) * 300)
        hits.append(seen.get(key) == served)
        seen[key] = served
    return hits


async def test_the_attackers_hits_and_misses_do_not_depend_on_the_victims_traffic(
    make_proxy: StartProxy, blob_upstreams: dict[str, str]
) -> None:
    quiet = await attacker_sees(await start(make_proxy, blob_upstreams), victim_busy=False)
    busy = await attacker_sees(await start(make_proxy, blob_upstreams), victim_busy=True)
    assert quiet == busy
    assert True in quiet and False in quiet[13:]  # it hits, and it evicts its own


# --- the same in Redis --------------------------------------------------------------------------------


@pytest.fixture
async def redis_cache() -> AsyncIterator[tuple[RedisResponseCache, RedisState]]:
    server = RedisServer(require_redis_server())
    server.start()
    config = StateConfig(backend="redis", url=server.url, key_prefix=f"t{secrets.token_hex(4)}")
    state = RedisState(config, Metrics(), "test")
    try:
        yield RedisResponseCache(state, max_entry_bytes=10_000, max_bytes=MAX_BYTES), state
    finally:
        await state.close()
        server.stop()


def key(tenant: str, name: str) -> tuple[str, None, str, str, str, str, str]:
    return (tenant, None, "http:u", "2026-07-28", "tools/call", name, "d")


async def test_in_redis_each_tenant_stays_within_its_budget_and_evicts_only_its_own(
    redis_cache: tuple[RedisResponseCache, RedisState],
) -> None:
    cache, state = redis_cache
    budget = 10_000
    assert cache.put(key("acme", "report"), b"a" * 2_000, 60, budget)
    for index in range(30):
        assert cache.put(key("globex", f"fill-{index}"), b"g" * 2_000, 60, budget)
        await state.written()
    assert await cache.fetch(key("acme", "report")) == b"a" * 2_000
    assert await cache.fetch(key("globex", "fill-29")) == b"g" * 2_000  # its newest stay
    assert await cache.fetch(key("globex", "fill-0")) is None  # its oldest went
    sizes = await state.client.hgetall(state.key("globex", "cache-sizes"))
    assert int(sizes[b"total"]) <= budget
    assert int(sizes[b"total"]) == 4 * (2_000 + ENTRY_OVERHEAD_BYTES)
    assert await state.client.zcard(state.key("globex", "cache-age")) == 4

    cache.invalidate("globex", ("tools/call",))
    await state.written()
    assert await cache.fetch(key("globex", "fill-29")) is None
    assert int((await state.client.hgetall(state.key("globex", "cache-sizes"))).get(b"total", 0)) == 0
    acme = await state.client.hgetall(state.key("acme", "cache-sizes"))
    assert int(acme[b"total"]) == 2_000 + ENTRY_OVERHEAD_BYTES


async def test_in_redis_expired_entries_leave_the_tenants_count(
    redis_cache: tuple[RedisResponseCache, RedisState],
) -> None:
    cache, state = redis_cache
    cache.put(key("acme", "brief"), b"a" * 3_000, 0.05, 10_000)
    await state.written()
    await asyncio.sleep(0.1)
    cache.put(key("acme", "next"), b"a" * 1_000, 60, 10_000)
    await state.written()
    sizes = await state.client.hgetall(state.key("acme", "cache-sizes"))
    assert int(sizes[b"total"]) == 1_000 + ENTRY_OVERHEAD_BYTES
    assert await state.client.zcard(state.key("acme", "cache-expiry")) == 1
