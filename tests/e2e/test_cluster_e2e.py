"""Two proxy replicas sharing a real Redis Cluster (three masters on loopback, made by
`redis-cli --cluster create`), in front of the tenants' own SDK upstreams with their canaries.

Every key of a tenant carries its hash tag, so it lives in one slot: the session, limit and
cache scripts and transactions run there (no CROSSSLOT), and what one replica did the other
sees, as with a single Redis. A master killed mid-run: the proxy fails closed exactly as with a
single Redis down, and recovers when the master is back.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis_asyncio
from aiohttp import web
from redis.crc import key_slot

from proxy.config import ProxyConfig
from proxy.http.server import start_server
from tests.conftest import TENANTS, proxy_config
from tests.e2e.test_scaleout_e2e import (
    HANDSHAKE,
    INITIALIZE,
    MODERN,
    PUBLIC,
    Replica,
    as_bytes,
    call,
    initialize,
    modern_call,
    post,
    tool_calls,
    tool_json,
    written,
)
from tests.factories import RsaKeys, token
from tests.redis_cluster import ClusterNode, RedisCluster
from tests.upstreams import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    made = RedisCluster.create(tmp_path_factory.mktemp("cluster"))
    try:
        yield made
    finally:
        made.stop()


class Pair:
    """Two replicas on one cluster under a key prefix of their own."""

    def __init__(self, a: Replica, b: Replica, prefix: str, cluster: RedisCluster) -> None:
        self.a, self.b, self.prefix, self.cluster = a, b, prefix, cluster

    @staticmethod
    def token(tenant: str = "acme", sub: str = "alice") -> str:
        return token(tenant=tenant, sub=sub, aud=PUBLIC)

    async def keys(self) -> dict[str, tuple[ClusterNode, bytes]]:
        """Every key under this pair's prefix: the master holding it and a rendering of its value."""
        found: dict[str, tuple[ClusterNode, bytes]] = {}
        for node in self.cluster.nodes:
            client = redis_asyncio.Redis(host="127.0.0.1", port=node.port)
            try:
                async for raw in client.scan_iter(match=f"{self.prefix}:*"):
                    key = as_bytes(raw).decode()
                    kind = as_bytes(await client.type(key)).decode()
                    value = b""
                    if kind == "string":
                        value = as_bytes(await client.get(key) or b"")
                    elif kind == "stream":
                        value = b"\n".join(
                            as_bytes(f[b"record"]) for _, f in await client.xrange(key) or [] if f
                        )
                    found[key] = (node, value)
            finally:
                await client.aclose()
        return found

    def master_of(self, tenant: str) -> ClusterNode:
        return master_of(self.cluster, self.prefix, tenant)


def master_of(cluster: RedisCluster, prefix: str, tenant: str) -> ClusterNode:
    """The master serving the tenant's slot (the slot computed, its master asked of the cluster)."""
    slot = key_slot(f"{prefix}:{{{tenant}}}".encode())
    for node in cluster.nodes:
        if any(low <= slot <= high for low, high in cluster.slots(node)):
            return node
    raise AssertionError(f"no master serves slot {slot}")


StartPair = Callable[..., Awaitable[Pair]]


@pytest.fixture
async def start_pair(tmp_path: Path, rsa_keys: RsaKeys, cluster: RedisCluster) -> AsyncIterator[StartPair]:
    runners: list[web.AppRunner] = []

    async def start(upstreams: dict[str, Any], prefix: str | None = None, **overrides: Any) -> Pair:
        prefix = prefix or f"c{secrets.token_hex(4)}"
        replicas = []
        for _ in range(2):
            data = proxy_config(PUBLIC, upstreams, tmp_path, rsa_keys, **overrides)
            port = free_port()
            data["listen"].update(host="127.0.0.1", port=port, path="/mcp")
            data["state"] = {"backend": "redis", "url": cluster.url, "key_prefix": prefix}
            runner, _ = await start_server(ProxyConfig.model_validate(data, context={}))
            runners.append(runner)
            replicas.append(Replica(f"http://127.0.0.1:{port}/mcp", runner.app))
        return Pair(replicas[0], replicas[1], prefix, cluster)

    try:
        yield start
    finally:
        for runner in runners:
            await runner.cleanup()


def with_policy(tmp_path: Path, policy: dict[str, Any]) -> dict[str, Any]:
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "p.yaml").write_text(json.dumps(policy))
    return {"policies_dir": str(policies)}


def each_with_policy(upstreams: dict[str, Any]) -> dict[str, Any]:
    return {t: {"upstream": {"url": u.url}, "policy": "p"} for t, u in upstreams.items()}


async def test_a_session_lives_in_its_tenants_slot_and_continues_on_the_other_replica_for_its_owner_only(
    start_pair: StartPair, upstreams: dict[str, Any]
) -> None:
    pair = await start_pair(upstreams)
    alice = pair.token("acme", "alice")
    session = await initialize(pair.a.url, alice)
    answer = await post(pair.b.url, call("whoami"), alice, session, HANDSHAKE)
    assert (answer.status, tool_json(answer)["canary"]) == (200, upstreams["acme"].canary)
    for thief in (pair.token("globex", "alice"), pair.token("acme", "mallory")):
        assert (await post(pair.a.url, call("whoami"), thief, session, HANDSHAKE)).status == 404
    await initialize(pair.b.url, pair.token("globex", "bob"))

    keys = await pair.keys()
    for tenant in TENANTS:
        mine = [key for key in keys if key.startswith(f"{pair.prefix}:{{{tenant}}}:")]
        assert len(mine) >= 2, keys  # the session's record and the tenant's set of sessions
        assert len({key_slot(key.encode()) for key in mine}) == 1  # one slot, so one master
        assert {keys[key][0].port for key in mine} == {pair.master_of(tenant).port}
    # Besides: the seal key and the set of tenants a sweep looks for orphans in, each a key alone.
    assert not [
        key for key in keys if key.split(":")[1].strip("{}") not in (*TENANTS, "seal-key", "session-tenants")
    ]

    async with aiohttp.ClientSession() as http:  # ended through B (a transaction in the slot) ...
        headers = {
            "Authorization": f"Bearer {alice}",
            "Mcp-Session-Id": session,
            "MCP-Protocol-Version": HANDSHAKE,
        }
        async with http.delete(pair.b.url, headers=headers) as ended:
            assert ended.status == 200
    assert (await post(pair.a.url, call("whoami"), alice, session, HANDSHAKE)).status == 404  # ... gone on A
    assert not any(session in key for key in await pair.keys())


async def test_a_cached_result_is_shared_by_the_replicas_for_its_tenant_and_invalidated_in_its_slot(
    start_pair: StartPair, upstreams: dict[str, Any], tmp_path: Path
) -> None:
    policy = with_policy(tmp_path, {"tools": {"cache_ttl_seconds": {"whoami": 60}}})
    pair = await start_pair(upstreams, tenants=each_with_policy(upstreams), **policy)
    acme, globex = pair.token("acme"), pair.token("globex")
    first = await post(pair.a.url, modern_call("whoami"), acme, version=MODERN)
    await written(pair.a)
    again = await post(pair.b.url, modern_call("whoami", request_id=7), acme, version=MODERN)
    assert tool_json(again) == tool_json(first) and tool_json(again)["canary"] == upstreams["acme"].canary
    assert tool_calls(upstreams["acme"]) == 1  # B answered from what A stored
    other = await post(pair.b.url, modern_call("whoami"), globex, version=MODERN)
    assert tool_json(other)["canary"] == upstreams["globex"].canary
    await written(pair.b)
    cached = {k: v for k, (_, v) in (await pair.keys()).items() if k.split(":")[2:3] == ["cache"]}
    assert {k.split(":")[1] for k in cached} == {"{acme}", "{globex}"}
    for key, value in cached.items():
        tenant = key.split(":")[1].strip("{}")
        assert upstreams[tenant].canary.encode() in value
        assert upstreams[next(t for t in TENANTS if t != tenant)].canary.encode() not in value

    cache = pair.b.services.cache
    assert cache is not None
    cache.invalidate("acme")  # the index read and a multi-key DEL, both in acme's slot
    await written(pair.b)
    left = {k for k in await pair.keys() if k.split(":")[2:3] == ["cache"]}
    assert {k.split(":")[1] for k in left} == {"{globex}"}
    await post(pair.a.url, modern_call("whoami", request_id=8), acme, version=MODERN)
    assert tool_calls(upstreams["acme"]) == 2


async def test_a_tenants_rate_and_concurrency_limits_hold_across_the_replicas(
    start_pair: StartPair, upstreams: dict[str, Any]
) -> None:
    pair = await start_pair(upstreams, limits={"requests_per_second": 0.05, "burst": 4, "max_concurrent": 1})
    statuses: dict[str, list[int]] = {tenant: [] for tenant in TENANTS}
    for tenant in TENANTS:
        for index in range(6):
            replica = (pair.a, pair.b)[index % 2]
            answer = await post(
                replica.url, modern_call("whoami", request_id=index), pair.token(tenant), version=MODERN
            )
            statuses[tenant].append(answer.status)
            await written(replica)  # its slot given back (in the background) before the next request
    assert statuses == {tenant: [200] * 4 + [429] * 2 for tenant in TENANTS}  # one bucket per tenant

    fresh = await start_pair(upstreams, limits={"max_concurrent": 1})
    acme = fresh.token("acme")
    slow = asyncio.create_task(
        post(fresh.a.url, modern_call("countdown", {"n": 2, "delay": 0.4}), acme, version=MODERN)
    )
    while not [k for k in await fresh.keys() if k.endswith(":inflight")]:  # A holds the slot
        await asyncio.sleep(0.02)
    refused = await post(fresh.b.url, modern_call("whoami"), acme, version=MODERN)
    assert refused.status == 429 and refused.message["error"]["data"]["limit"] == "concurrency"
    assert (
        await post(fresh.b.url, modern_call("whoami"), fresh.token("globex"), version=MODERN)
    ).status == 200
    assert (await slow).status == 200
    await written(fresh.a)
    assert (await post(fresh.b.url, modern_call("whoami"), acme, version=MODERN)).status == 200


async def test_audit_records_of_both_replicas_go_to_the_tenants_own_stream(
    start_pair: StartPair, upstreams: dict[str, Any]
) -> None:
    pair = await start_pair(upstreams)
    for tenant in TENANTS:
        for replica in (pair.a, pair.b):
            body = modern_call("add_note", {"tenant_id": tenant, "text": f"{tenant}-private-text"})
            assert (await post(replica.url, body, pair.token(tenant), version=MODERN)).status == 200
    for replica in (pair.a, pair.b):
        replica.services.reports.run_now()
        replica.services.audit._hand_over()
        await written(replica)
    keys = await pair.keys()
    for tenant in TENANTS:
        node, stream = keys[f"{pair.prefix}:{{{tenant}}}:audit"]
        assert node.port == pair.master_of(tenant).port
        records = [json.loads(line) for line in stream.splitlines()]
        assert [r["name"] for r in records if r["method"] == "tools/call"] == ["add_note"] * 2
        assert {r["tenant"] for r in records} == {tenant} and b"private-text" not in stream


async def test_a_redis_set_allowlist_admits_template_tenants_on_a_cluster(
    start_pair: StartPair, shared_upstream: Any, cluster: RedisCluster
) -> None:
    allowlist = f"allowed-{secrets.token_hex(4)}"
    pair = await start_pair(
        {},
        tenants={},
        tenant_templates=[{"match": "team-[0-9]+", "upstream": {"url": shared_upstream.url}}],
        tenant_allowlist={"redis_set": allowlist, "cache_seconds": 0.001},  # asked again on each request
    )
    client = redis_asyncio.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
    try:
        assert (
            await post(pair.a.url, modern_call("whoami"), pair.token("team-1"), version=MODERN)
        ).status == 403
        await client.sadd(allowlist, "team-1")
        for replica in (pair.a, pair.b):
            answer = await post(replica.url, modern_call("whoami"), pair.token("team-1"), version=MODERN)
            assert tool_json(answer)["canary"] == shared_upstream.canary
        assert (
            await post(pair.b.url, modern_call("whoami"), pair.token("team-2"), version=MODERN)
        ).status == 403
        await client.srem(allowlist, "team-1")
        assert (
            await post(pair.a.url, modern_call("whoami"), pair.token("team-1"), version=MODERN)
        ).status == 403
    finally:
        await client.delete(allowlist)
        await client.aclose()


async def test_a_master_killed_mid_run_fails_closed_and_the_proxy_recovers_with_it(
    start_pair: StartPair, upstreams: dict[str, Any], shared_upstream: Any, cluster: RedisCluster
) -> None:
    shared = shared_upstream
    # A tenant whose slot another master serves (only the hash tag counts: the prefix does not).
    acme_master = master_of(cluster, "any", "acme")
    other = next(f"other-{i}" for i in range(100) if master_of(cluster, "any", f"other-{i}") != acme_master)
    tenants = {"acme": {"upstream": {"url": upstreams["acme"].url}}, other: {"upstream": {"url": shared.url}}}
    pair = await start_pair(upstreams, tenants=tenants)
    a, b = pair.a.url, pair.b.url
    alice = pair.token("acme", "alice")
    session = await initialize(a, alice)
    assert (await post(b, call("whoami"), alice, session, HANDSHAKE)).status == 200
    victim = pair.master_of("acme")
    victim.stop()
    try:
        # The session's master is gone: not found (never someone else's), no upstream call.
        before = tool_calls(upstreams["acme"])
        for replica in (a, b):
            lost = await post(replica, call("whoami"), alice, session, HANDSHAKE)
            assert (lost.status, lost.message["error"]["code"]) == (404, -32004)
        assert tool_calls(upstreams["acme"]) == before
        # Once the other masters see it failed, the cluster refuses every slot, the other tenant's
        # on a live master too: no session for any tenant, as with a single Redis down (503) ...
        pair.cluster.wait_until_failed()
        for tenant in (other, "acme"):
            refused = await post(b, INITIALIZE, pair.token(tenant))
            assert (refused.status, refused.message["error"]["code"]) == (503, -32013), refused.body
            assert "Retry-After" in refused.headers
            assert pair.b.services.shared is not None and not pair.b.services.shared.up
        # ... while stateless traffic is still served, by both replicas, for every tenant.
        canaries = {"acme": upstreams["acme"].canary, other: shared.canary}
        for tenant, canary in canaries.items():
            for replica in (a, b):
                served = await post(replica, modern_call("whoami"), pair.token(tenant), version=MODERN)
                assert tool_json(served)["canary"] == canary
        async with aiohttp.ClientSession() as http:
            await pair.a.services.connect()  # what the readiness loop does every check interval
            async with http.get(a.replace("/mcp", "/readyz")) as ready:
                assert ready.status == 200
                assert (await ready.json())["state"] == {"backend": "redis", "up": False}
            async with http.get(pair.a.metrics_url) as metrics:
                assert "mcp_proxy_state_up 0.0" in await metrics.text()
    finally:
        victim.start()  # same ports and nodes file: it rejoins with its slots, and no data
        pair.cluster.wait_until_ok()
    for each in (pair.a, pair.b):
        await each.services.connect()
    assert (await post(a, call("whoami"), alice, session, HANDSHAKE)).status == 404  # its master lost it
    fresh = await initialize(b, alice)
    answer = await post(a, call("whoami"), alice, fresh, HANDSHAKE)
    assert (answer.status, tool_json(answer)["canary"]) == (200, upstreams["acme"].canary)
    await initialize(a, pair.token(other))
    async with aiohttp.ClientSession() as http, http.get(b.replace("/mcp", "/readyz")) as ready:
        assert (await ready.json())["state"] == {"backend": "redis", "up": True}
