"""The response cache without sockets: keys, canonical params, bounds, expiry, single flight."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from proxy.layers.cache.store import (
    ENTRY_OVERHEAD_BYTES,
    CacheKey,
    CachePlan,
    ResponseCache,
    params_digest,
    plan_for,
    tenant_budget,
)


def key(tenant: str, name: str = "t", digest: str = "d", principal: str | None = None) -> CacheKey:
    return (tenant, principal, "http:u", "2026-07-28", "tools/call", name, digest)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"arguments": {"n": 1}}, {"arguments": {"n": 1.0}}),
        ({"arguments": {"n": 1}}, {"arguments": {"n": True}}),
        ({"arguments": {"n": 1}}, {"arguments": {"n": "1"}}),
        ({"arguments": {"n": 0}}, {"arguments": {"n": False}}),
        ({"arguments": {"n": None}}, {"arguments": {}}),
        ({"arguments": {"a": "b:c"}}, {"arguments": {"a:b": "c"}}),
        ({"arguments": {"s": "x"}}, {"arguments": {"s": "x "}}),
        ({"_meta": {"io.modelcontextprotocol/clientCapabilities": {}}}, {"_meta": {}}),
    ],
)
def test_digest_keeps_types_and_values_apart(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert params_digest(a) != params_digest(b)


def test_digest_ignores_key_order_and_volatile_meta() -> None:
    one = {"name": "t", "arguments": {"a": 1, "b": [1, {"y": 2, "x": 1}]}, "_meta": {"progressToken": 7}}
    two = {
        "_meta": {"progressToken": "other", "io.modelcontextprotocol/clientInfo": {"name": "c"}},
        "arguments": {"b": [1, {"x": 1, "y": 2}], "a": 1},
        "name": "t",
    }
    assert params_digest(one) == params_digest(two)
    assert params_digest({"arguments": {"a": [1, 2]}}) != params_digest({"arguments": {"a": [2, 1]}})


def test_digest_of_values_orjson_refuses_is_stable_and_apart() -> None:
    """Integers beyond 64 bits and lone surrogates take the standard library's way: still one digest
    for one value, whatever its key order, and never another value's."""
    big = {"arguments": {"n": 10**30, "s": "\udc80", "t": "é"}}
    reordered = {"arguments": {"t": "é", "s": "\udc80", "n": 10**30}}
    assert params_digest(big) == params_digest(reordered)
    assert params_digest(big) != params_digest({"arguments": {"n": 10**30 + 1, "s": "\udc80", "t": "é"}})
    assert params_digest({"arguments": {"n": 10**30}}) != params_digest({"arguments": {"n": 1e30}})
    assert params_digest({"arguments": {"s": "\udc80"}}) != params_digest({"arguments": {"s": "\\udc80"}})


def test_keys_are_tuples_so_separator_tricks_cannot_collide() -> None:
    cache = ResponseCache(1 << 20, 1 << 16)
    cache.put(key("a:b", name="c"), b'{"v":"a:b/c"}', 60)
    assert cache.get(key("a", name="b:c")) is None
    assert cache.get(key("a:b", name="c")) == b'{"v":"a:b/c"}'
    cache.put(key("acme", principal="alice"), b"1", 60)
    assert cache.get(key("acme")) is None
    assert cache.get(key("acme", principal="bob")) is None


def test_byte_bound_is_kept_whatever_is_stored() -> None:
    cache = ResponseCache(max_bytes=10_000, max_entry_bytes=5_000)
    for index in range(200):
        cache.put(key("acme", digest=str(index)), b"x" * 900, 60)
        assert cache.size_bytes <= 10_000
    assert 0 < len(cache) < 200
    assert cache.get(key("acme", digest="199")) is not None  # the newest stays; the oldest went
    assert cache.get(key("acme", digest="0")) is None
    assert not cache.put(key("acme", digest="big"), b"x" * 5_001, 60)
    assert not cache.put(key("acme", digest="zero"), b"x", 0)


def test_entries_expire() -> None:
    cache = ResponseCache(1 << 20, 1 << 16)
    cache.put(key("acme"), b"1", 0.05)
    assert cache.get(key("acme")) == b"1"
    time.sleep(0.08)
    assert cache.get(key("acme")) is None


def test_invalidation_is_per_tenant_method_and_name() -> None:
    cache = ResponseCache(1 << 20, 1 << 16)
    for tenant in ("acme", "globex"):
        cache.put((tenant, None, "u", "v", "tools/list", "", "d"), b"1", 60)
        cache.put((tenant, None, "u", "v", "resources/read", "notes://x/a", "d"), b"1", 60)
        cache.put((tenant, None, "u", "v", "resources/read", "notes://x/b", "d"), b"1", 60)
    assert cache.invalidate("acme", ("resources/read",), "notes://x/a") == 1
    assert cache.invalidate("acme", ("tools/list",)) == 1
    assert len(cache) == 4
    assert cache.invalidate("globex") == 3
    assert [k[0] for k, _ in cache.entries()] == ["acme"]


def test_storing_evicts_only_the_storing_tenants_own_entries() -> None:
    cache = ResponseCache(max_bytes=100_000, max_entry_bytes=5_000)
    budget = 10_000
    cache.put(key("victim"), b"v" * 900, 60, budget)
    for index in range(200):  # far past the attacker's own budget, and past the global bound's share
        assert cache.put(key("attacker", digest=str(index)), b"x" * 900, 60, budget)
        assert cache.tenant_bytes("attacker") <= budget
    assert cache.get(key("victim")) == b"v" * 900
    assert cache.get(key("attacker", digest="199")) is not None  # its newest stay; its oldest went
    assert cache.get(key("attacker", digest="0")) is None
    assert cache.size_bytes == cache.tenant_bytes("victim") + cache.tenant_bytes("attacker")


def test_what_a_tenant_finds_does_not_depend_on_another_tenants_traffic() -> None:
    def attacker_sees(victim_traffic: bool) -> list[bool]:
        cache = ResponseCache(max_bytes=20_000, max_entry_bytes=5_000)
        seen = []
        for index in range(60):
            if victim_traffic:
                cache.put(key("victim", digest=str(index)), b"v" * (index * 37 % 3000), 60, 10_000)
                cache.get(key("victim", digest=str(index // 2)))
            probe = key("attacker", digest=str(index * index % 11))
            seen.append(cache.get(probe) is not None)
            if not seen[-1]:
                cache.put(probe, b"a" * (400 + index * 53 % 2000), 60, 10_000)
        return seen

    assert attacker_sees(victim_traffic=True) == attacker_sees(victim_traffic=False)
    assert True in attacker_sees(False) and False in attacker_sees(False)  # hits and misses both


def test_the_global_bound_holds_and_takes_only_from_the_storing_tenant() -> None:
    cache = ResponseCache(max_bytes=10_000, max_entry_bytes=5_000)  # budgets overcommitted: 2 x 8,000
    for index in range(5):
        assert cache.put(key("acme", digest=str(index)), b"a" * 1_400, 60, 8_000)
    for index in range(10):
        cache.put(key("globex", digest=str(index)), b"g" * 1_400, 60, 8_000)
        assert cache.size_bytes <= 10_000
    assert all(cache.get(key("acme", digest=str(index))) for index in range(5))  # acme's all stay
    assert cache.get(key("globex", digest="9")) is not None


def test_a_budget_changed_by_a_reload_keeps_the_newest_entries_that_fit() -> None:
    cache = ResponseCache(max_bytes=100_000, max_entry_bytes=5_000)
    for index in range(8):
        cache.put(key("acme", digest=str(index)), b"a" * 800, 60, 10_000)
    cache.put(key("acme", digest="new"), b"a" * 800, 60, 3_000)
    assert cache.tenant_bytes("acme") <= 3_000
    assert cache.get(key("acme", digest="new")) is not None
    assert cache.get(key("acme", digest="7")) is not None
    assert cache.get(key("acme", digest="0")) is None
    assert cache.size_bytes == cache.tenant_bytes("acme")


def test_the_default_budget_shares_out_the_bound_but_holds_one_entry() -> None:
    assert tenant_budget(64_000_000, 1_000_000, None, 2) == 32_000_000
    assert tenant_budget(64_000_000, 1_000_000, None, 1000) == 1_000_000 + ENTRY_OVERHEAD_BYTES
    assert tenant_budget(64_000_000, 1_000_000, 5_000_000, 2) == 5_000_000


async def test_single_flight_shares_one_result_and_settles_followers() -> None:
    cache = ResponseCache(1 << 20, 1 << 16)
    assert cache.join(key("acme")) is None  # the leader
    followers = [cache.join(key("acme")) for _ in range(5)]
    assert all(f is followers[0] for f in followers) and followers[0] is not None
    assert cache.join(key("globex")) is None  # another tenant never shares the flight
    cache.settle(key("acme"), b"result")
    assert await asyncio.wait_for(followers[0], 1) == b"result"
    assert cache.join(key("acme")) is None  # settled: the next miss leads again


def plan(**overrides: object) -> CachePlan | None:
    args: dict[str, Any] = {
        "tenant": "acme",
        "subject": "alice",
        "upstream": "http:u",
        "version": "2026-07-28",
        "modern": True,
        "method": "tools/call",
        "params": {"name": "lookup", "arguments": {"k": 1}},
        "tool_ttls": {"lookup": 30.0},
    }
    args.update(overrides)
    return plan_for(**args)


def test_what_may_be_cached() -> None:
    assert plan() is not None
    assert plan(tool_ttls={}) is None  # a tool the policy does not list
    assert plan(tool_ttls=None) is None
    assert plan(params={"name": "lookup", "arguments": {}, "requestState": "s"}) is None
    assert plan(params={"name": "lookup", "inputResponses": {}}) is None
    assert plan(method="tools/list", params={}) is not None
    assert plan(method="tools/list", params={}, modern=False) is None  # no hints in that era
    assert plan(method="completion/complete", params={}) is None
    read = plan(method="resources/read", params={"uri": "notes://acme/a"})
    assert read is not None
    assert read.name == "notes://acme/a"


def test_what_is_stored_and_under_which_principal() -> None:
    tool = plan()
    assert tool is not None
    assert tool.store_key_and_ttl({"content": []}) == (tool.key(None), 30.0)
    assert tool.store_key_and_ttl({"content": [], "isError": True}) is None
    assert tool.store_key_and_ttl({"resultType": "input_required"}) is None
    listing = plan(method="tools/list", params={})
    assert listing is not None
    assert listing.store_key_and_ttl({"tools": [], "ttlMs": 0}) is None
    assert listing.store_key_and_ttl({"tools": []}) is None
    assert listing.store_key_and_ttl({"tools": [], "ttlMs": 5000, "cacheScope": "public"}) == (
        listing.key(None),
        5.0,
    )
    assert listing.store_key_and_ttl({"tools": [], "ttlMs": 5000, "cacheScope": "private"}) == (
        listing.key("alice"),
        5.0,
    )
    assert listing.store_key_and_ttl({"tools": [], "ttlMs": 5000}) == (listing.key("alice"), 5.0)
    assert listing.flight_key == listing.key("alice")
    assert tool.flight_key == tool.key(None)
