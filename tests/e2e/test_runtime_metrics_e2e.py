"""The process, the event loop, upstream pools, open streams, Redis round trips and HTTP status
classes in /metrics, scraped from a running proxy (its own metrics listener)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.ops.runtime_metrics import LAG_INTERVAL_SECONDS
from tests.conftest import RunningProxy, StartProxy
from tests.e2e.test_transport_e2e import _get_headers, call_body, initialize, modern_headers
from tests.redis_server import RedisServer, started_redis_server

pytestmark = pytest.mark.e2e

Labels = dict[str, str]


async def scrape(running: RunningProxy) -> dict[str, list[tuple[Labels, float]]]:
    """Every sample of /metrics, by sample name."""
    async with aiohttp.ClientSession() as http, http.get(running.metrics_url) as response:
        assert response.status == 200
        text = await response.text()
    samples: dict[str, list[tuple[Labels, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: dict[str, list[tuple[Labels, float]]], name: str, **labels: str) -> float | None:
    found = [v for sample_labels, v in samples.get(name, []) if labels.items() <= sample_labels.items()]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


async def eventually(running: RunningProxy, name: str, expected: float, **labels: str) -> None:
    """The sample reaches `expected` (a stream's end is noticed by the proxy a moment after)."""
    deadline = time.monotonic() + 10
    while (current := value(await scrape(running), name, **labels)) != expected:
        assert time.monotonic() < deadline, (name, labels, current)
        await asyncio.sleep(0.05)


async def whoami(running: RunningProxy, tenant: str = "acme") -> None:
    status, _, body = await running.post(
        call_body("whoami", {}), token=running.token(tenant), headers=modern_headers("tools/call", "whoami")
    )
    assert status == 200, body


async def test_the_process_and_a_stalled_event_loop_are_measured(proxy: RunningProxy) -> None:
    before = await scrape(proxy)
    assert (value(before, "process_resident_memory_bytes") or 0) > 0
    assert value(before, "process_open_fds") is not None
    assert before["python_info"] and before["python_gc_collections_total"]
    lag_before = value(before, "mcp_proxy_event_loop_lag_seconds_sum") or 0.0
    time.sleep(LAG_INTERVAL_SECONDS + 0.4)  # the loop stalls (on purpose): the lag timer runs late
    after = await scrape(proxy)
    assert (value(after, "mcp_proxy_event_loop_lag_seconds_sum") or 0.0) - lag_before >= 0.3
    count = value(after, "mcp_proxy_event_loop_lag_seconds_count") or 0
    late = count - (value(after, "mcp_proxy_event_loop_lag_seconds_bucket", le="0.25") or 0)
    assert late >= 1


async def test_upstream_pools_and_open_streams_are_gauged_per_tenant(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    await whoami(proxy)
    samples = await scrape(proxy)
    for tenant, kept in (("acme", 1.0), ("globex", 0.0)):  # a kept-alive connection, or none yet
        assert value(samples, "mcp_proxy_upstream_connections", tenant=tenant, state="idle") == kept
        assert value(samples, "mcp_proxy_upstream_connections", tenant=tenant, state="in_use") == 0
        assert value(samples, "mcp_proxy_open_streams", tenant=tenant, kind="get") == 0

    session_id = await initialize(proxy, proxy.token("acme"))
    async with (
        aiohttp.ClientSession() as http,
        http.get(proxy.url, headers=_get_headers(proxy, session_id)) as stream,
    ):
        assert stream.status == 200
        during = await scrape(proxy)
        assert value(during, "mcp_proxy_open_streams", tenant="acme", kind="get") == 1
        assert value(during, "mcp_proxy_open_streams", tenant="globex", kind="get") == 0
        assert value(during, "mcp_proxy_open_streams", tenant="acme", kind="listen") == 0
        assert (value(during, "mcp_proxy_upstream_connections", tenant="acme", state="in_use") or 0) >= 1
    await eventually(proxy, "mcp_proxy_open_streams", 0, tenant="acme", kind="get")
    await eventually(proxy, "mcp_proxy_upstream_connections", 0, tenant="acme", state="in_use")


async def test_answers_are_counted_by_http_status_class(
    make_proxy: StartProxy, upstreams: dict[str, Any]
) -> None:
    running = await make_proxy(
        {"acme": upstreams["acme"], "globex": "http://127.0.0.1:9/mcp"}  # nothing listens there
    )
    await whoami(running)
    status, _, _ = await running.post(
        call_body("whoami", {}), token=running.token("globex"), headers=modern_headers("tools/call", "whoami")
    )
    assert status == 502
    samples = await scrape(running)
    assert value(samples, "mcp_proxy_responses_total", tenant="acme", status_class="2xx") == 1
    assert value(samples, "mcp_proxy_responses_total", tenant="globex", status_class="5xx") == 1
    assert value(samples, "mcp_proxy_responses_total", tenant="acme", status_class="5xx") is None


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from started_redis_server()


async def test_redis_round_trips_are_timed_by_operation(
    make_proxy: StartProxy, upstreams: dict[str, Any], redis_server: RedisServer
) -> None:
    running = await make_proxy(upstreams, state={"backend": "redis", "url": redis_server.url})
    await initialize(running, running.token("acme"))  # a session: reserved and created in Redis
    samples = await scrape(running)
    assert value(samples, "mcp_proxy_state_up") == 1
    for operation in ("session_reserve", "session_create"):
        assert (value(samples, "mcp_proxy_state_call_duration_seconds_count", operation=operation) or 0) >= 1
        assert (value(samples, "mcp_proxy_state_call_duration_seconds_sum", operation=operation) or 0) > 0
    operations = {labels["operation"] for labels, _ in samples["mcp_proxy_state_call_duration_seconds_count"]}
    assert all(operation.isidentifier() for operation in operations)  # the proxy's names, never keys
