"""Operations: health and readiness, metrics, per-tenant limits, hot reload, SIGTERM drain, logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import load_config
from proxy.http.keys import METRICS_LISTENER, SERVICES
from proxy.http.server import start_server
from proxy.ops.reload import reload_config
from tests.conftest import MCP_ACCEPT, TENANTS, RunningProxy, StartProxy, proxy_config
from tests.e2e.test_scaleout_e2e import redis_server  # noqa: F401 - a fixture
from tests.e2e.test_transport_e2e import sse_messages
from tests.factories import DEV_SECRET, DEV_SECRET_ENV, HANDSHAKE_INITIALIZE
from tests.upstreams import free_port, start_notes_upstream

pytestmark = pytest.mark.e2e
META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}


async def call(
    running: RunningProxy, tenant: str, name: str = "whoami", arguments: Any = None
) -> tuple[int, Any]:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": name, "arguments": arguments or {}, "_meta": META}}  # fmt: skip
    headers = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": name}
    status, response_headers, raw = await running.post(body, token=running.token(tenant), headers=headers)
    answer = json.loads(raw) if raw else None
    if answer is not None:
        answer["headers"] = response_headers
    return status, answer


async def get(url: str) -> tuple[int, Any, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        text = await response.text()
        return response.status, dict(response.headers), text


def base_url(running: RunningProxy) -> str:
    return running.url.rsplit("/", 1)[0]


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


async def test_health_readiness_and_metrics_need_no_token_and_name_no_tenant(proxy: RunningProxy) -> None:
    status, _, text = await get(base_url(proxy) + "/healthz")
    assert (status, json.loads(text)) == (200, {"status": "ok"})
    for _ in range(50):
        status, _, text = await get(base_url(proxy) + "/readyz")
        if status == 200:
            break
        await asyncio.sleep(0.05)
    body = json.loads(text)
    assert status == 200
    assert body["upstreams"] == {"reachable": 2, "total": 2, "required": "any"}
    assert not any(tenant in text for tenant in TENANTS)


async def test_readiness_follows_the_upstreams(make_proxy: StartProxy, upstreams: dict[str, Any]) -> None:
    dead = f"http://127.0.0.1:{free_port()}/mcp"
    running = await make_proxy(
        {"acme": upstreams["acme"], "globex": dead},
        readiness={"upstreams": "all", "check_interval_seconds": 0.1},
    )
    await asyncio.sleep(0.4)
    status, _, text = await get(base_url(running) + "/readyz")
    assert status == 503
    assert json.loads(text)["upstreams"] == {"reachable": 1, "total": 2, "required": "all"}


async def test_metrics_with_a_bearer_token_answer_only_that_token(
    make_proxy: StartProxy, upstreams: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MCP_TEST_METRICS_TOKEN", "scraper-token-0123456789")
    running = await make_proxy(upstreams, metrics={"bearer_token_env": "MCP_TEST_METRICS_TOKEN"})
    assert (await call(running, "globex"))[0] == 200
    url = running.metrics_url
    for sent in (None, "Bearer wrong", "Bearer scraper-token-012345678", running.token("acme")):
        headers = {"Authorization": sent} if sent is not None else {}
        async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as response:
            text = await response.text()
            assert response.status == 401
        assert "globex" not in text and "mcp_proxy" not in text
    headers = {"Authorization": "Bearer scraper-token-0123456789"}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as response:
        assert response.status == 200
        assert 'tenant="globex"' in await response.text()
    # A header that is not UTF-8 is refused like any wrong token, not a 500.
    port = running.app[METRICS_LISTENER].port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    assert status_line.split()[1] == b"401"


def test_a_metrics_token_variable_that_is_unset_or_short_is_a_config_error(
    tmp_path: Path, rsa_keys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.config import ConfigError, ProxyConfig
    from proxy.runtime import Runtime

    data = proxy_config("http://127.0.0.1:9/mcp", {"acme": "http://127.0.0.1:9/mcp"}, tmp_path, rsa_keys)
    data["metrics"] = {"bearer_token_env": "MCP_TEST_METRICS_TOKEN"}
    monkeypatch.setenv(DEV_SECRET_ENV, DEV_SECRET)
    for value in (None, "short"):
        if value is None:
            monkeypatch.delenv("MCP_TEST_METRICS_TOKEN", raising=False)
        else:
            monkeypatch.setenv("MCP_TEST_METRICS_TOKEN", value)
        with pytest.raises(ConfigError) as info:
            Runtime.build(ProxyConfig.model_validate(data, context={}))
        assert info.value.key_path == "metrics.bearer_token_env"


async def test_metrics_parse_and_count_what_happened(proxy: RunningProxy) -> None:
    for _ in range(3):
        assert (await call(proxy, "acme"))[0] == 200
    assert (await call(proxy, "globex", "no_such_tool"))[0] == 200  # the upstream's own error result
    status, _ = await call(proxy, "acme", "whoami", {"x": 1})
    assert status == 200
    await proxy.post({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, token="not-a-token")
    status, headers, text = await get(proxy.metrics_url)
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    requests = samples(text, "mcp_proxy_requests_total")
    key = (("method", "tools/call"), ("outcome", "ok"), ("tenant", "acme"))
    assert requests[key] == 4.0
    assert samples(text, "mcp_proxy_rejected_total")[(("status", "401"),)] == 1.0
    overhead = samples(text, "mcp_proxy_overhead_seconds_count")
    assert overhead[(("tenant", "acme"),)] == 4.0
    assert samples(text, "mcp_proxy_tenants")[()] == 2.0
    tenants_in_labels = {dict(k).get("tenant") for k in requests} - {None}
    assert tenants_in_labels <= set(TENANTS)


async def test_a_tenant_over_its_rate_gets_429_while_another_keeps_full_service(
    make_proxy: StartProxy, upstreams: dict[str, Any], tmp_path: Path
) -> None:
    limited = {"requests_per_second": 1, "burst": 2}
    running = await make_proxy(
        upstreams,
        tenants={
            "acme": {"upstream": {"url": upstreams["acme"].url}, "limits": limited},
            "globex": {"upstream": {"url": upstreams["globex"].url}},
        },
        audit={"dir": str(tmp_path / "audit")},
    )
    acme = await asyncio.gather(*(call(running, "acme") for _ in range(6)))
    globex = await asyncio.gather(*(call(running, "globex") for _ in range(6)))
    statuses = sorted(status for status, _ in acme)
    assert statuses.count(200) == 2
    assert statuses.count(429) == 4
    refused = next(answer for status, answer in acme if status == 429)
    assert refused["error"]["code"] == -32009
    assert "rate" in refused["error"]["message"]
    assert int(refused["headers"]["Retry-After"]) >= 1
    assert [status for status, _ in globex] == [200] * 6
    calls = [r for r in upstreams["acme"].recorder.snapshot() if '"method":"tools/call"' in r.text]
    assert len(calls) == 2  # refused requests never reached the upstream
    running.app[SERVICES].flush()
    records = [json.loads(line) for line in (tmp_path / "audit" / "acme.jsonl").read_text().splitlines()]
    # the audit record's documented outcomes only: a limited request is "denied", its code says which refusal
    # (limits apply before the body is read, so the record names no method).
    assert sorted(r["outcome"] for r in records) == ["denied"] * 4 + ["ok"] * 2
    assert {r["error_code"] for r in records if r["outcome"] == "denied"} == {-32009}


async def test_concurrency_limit(make_proxy: StartProxy, upstreams: dict[str, Any]) -> None:
    running = await make_proxy(upstreams, limits={"max_concurrent": 1})
    slow = asyncio.create_task(call(running, "acme", "countdown", {"n": 2, "delay": 0.3}))
    await asyncio.sleep(0.15)
    status, answer = await call(running, "acme")
    assert status == 429
    assert "in flight" in answer["error"]["message"]
    assert (await call(running, "globex"))[0] == 200  # another tenant has its own slot
    assert (await slow)[0] == 200
    assert (await call(running, "acme"))[0] == 200  # the slot came back


async def test_a_failing_upstream_opens_its_tenants_circuit_only(
    make_proxy: StartProxy, upstreams: dict[str, Any]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/mcp"
    running = await make_proxy(
        {"acme": dead, "globex": upstreams["globex"]},
        limits={"circuit_failures": 2, "circuit_open_seconds": 30},
    )
    assert [(await call(running, "acme"))[0] for _ in range(2)] == [502, 502]
    started = time.perf_counter()
    status, answer = await call(running, "acme")
    assert status == 503
    assert answer["error"]["code"] == -32012
    assert int(answer["headers"]["Retry-After"]) > 0
    assert time.perf_counter() - started < 0.2  # failing fast, no connect attempt
    assert (await call(running, "globex"))[0] == 200
    _, _, text = await get(running.metrics_url)
    assert samples(text, "mcp_proxy_circuit_open")[(("tenant", "acme"),)] == 1.0
    assert samples(text, "mcp_proxy_upstream_errors_total")[(("kind", "error"), ("tenant", "acme"))] == 2.0


# --- hot reload ------------------------------------------------------------------------------------


def write_config(path: Path, data: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(data))


async def test_reload_under_load_misroutes_nothing_and_drops_nothing(
    upstream_runner: Any, upstreams: dict[str, Any], tmp_path: Path, rsa_keys: Any
) -> None:
    extra = {
        name: start_notes_upstream(upstream_runner, name, f"CANARY-{name}")
        for name in ("umbrella", "initech", "globex-v2")
    }
    url = f"http://127.0.0.1:{free_port()}/mcp"
    before = proxy_config(
        url, {**upstreams, "umbrella": extra["umbrella"]}, tmp_path, rsa_keys, reload={"watch_files": False}
    )
    path = tmp_path / "proxy.yaml"
    write_config(path, before)
    runner, _ = await start_server(load_config(path, env={**os.environ, DEV_SECRET_ENV: DEV_SECRET}))
    running = RunningProxy(url, None, runner.app)
    canaries = {
        "acme": {upstreams["acme"].canary},
        "globex": {upstreams["globex"].canary, extra["globex-v2"].canary},
        "umbrella": {extra["umbrella"].canary},
        "initech": {extra["initech"].canary},
    }
    results: dict[str, list[tuple[int, str]]] = {t: [] for t in canaries}
    stop = asyncio.Event()

    async def hammer(tenant: str) -> None:
        while not stop.is_set():
            status, answer = await call(running, tenant)
            canary = answer["result"]["structuredContent"]["canary"] if status == 200 else ""
            results[tenant].append((status, canary))

    try:
        workers = [asyncio.create_task(hammer(t)) for t in canaries for _ in range(3)]
        await asyncio.sleep(0.4)
        after = json.loads(json.dumps(before))
        after["tenants"].pop("umbrella")
        after["tenants"]["initech"] = {"upstream": {"url": extra["initech"].url}}
        after["tenants"]["globex"]["upstream"]["url"] = extra["globex-v2"].url
        write_config(path, after)
        assert await reload_config(runner.app)
        await asyncio.sleep(0.4)
        stop.set()
        await asyncio.gather(*workers)
    finally:
        await runner.cleanup()
    for tenant, seen in results.items():
        for status, canary in seen:
            assert status in (200, 403), (tenant, status)
            if status == 200:
                assert canary in canaries[tenant], (tenant, canary)  # nothing misrouted
    assert results["acme"] and all(
        status == 200 for status, _ in results["acme"]
    )  # unchanged: nothing dropped
    assert results["globex"][-1] == (200, extra["globex-v2"].canary)  # the new upstream took over
    assert all(status == 200 for status, _ in results["globex"])
    assert results["umbrella"][-1][0] == 403  # removed: refused at once
    assert any(status == 200 for status, _ in results["initech"])  # added while running
    assert results["initech"][0][0] == 403  # unknown before the reload


@contextlib.asynccontextmanager
async def session_upstream(
    session_id: str, *, hang_on_delete: bool = False, hold: asyncio.Event | None = None
) -> AsyncIterator[tuple[str, list[str]]]:
    """A scripted handshake-era upstream: initialize answers with `session_id` (after `hold` is
    set, if given), DELETE is recorded (and hangs, if asked). Yields its URL and the DELETEs."""
    from aiohttp import web

    deletes: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.method == "DELETE":
            deletes.append(request.headers.get("Mcp-Session-Id", ""))
            if hang_on_delete:
                await asyncio.sleep(60)  # far beyond any test
            return web.Response(status=200)
        body = await request.json()
        if "id" not in body:
            return web.Response(status=202)
        if hold is not None:
            await hold.wait()
        result = {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "serverInfo": {"name": "s", "version": "1"},
        }
        return web.json_response(
            {"jsonrpc": "2.0", "id": body["id"], "result": result}, headers={"Mcp-Session-Id": session_id}
        )

    app = web.Application()
    app.router.add_route("*", "/mcp", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.2)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/mcp", deletes
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def reloadable_proxy(
    upstreams: dict[str, Any], tmp_path: Path, rsa_keys: Any, **overrides: Any
) -> AsyncIterator[tuple[RunningProxy, dict[str, Any], Path]]:
    """A proxy started from a config file (no file watch), its config data and the file."""
    url = f"http://127.0.0.1:{free_port()}/mcp"
    data = proxy_config(url, upstreams, tmp_path, rsa_keys, reload={"watch_files": False}, **overrides)
    path = tmp_path / "proxy.yaml"
    write_config(path, data)
    runner, _ = await start_server(load_config(path, env={**os.environ, DEV_SECRET_ENV: DEV_SECRET}))
    try:
        yield RunningProxy(url, None, runner.app), data, path
    finally:
        await runner.cleanup()


async def reload_with(
    running: RunningProxy, data: dict[str, Any], path: Path, acme_upstream: dict[str, Any]
) -> bool:
    """Reload with acme's upstream keys changed as given."""
    after = json.loads(json.dumps(data))
    after["tenants"]["acme"]["upstream"].update(acme_upstream)
    write_config(path, after)
    return await asyncio.wait_for(reload_config(running.app), 2)


async def test_a_result_fetched_under_the_old_config_never_serves_the_new_one(
    upstreams: dict[str, Any], tmp_path: Path, rsa_keys: Any
) -> None:
    """A cached call in flight across a reload that rotates the tenant's upstream credential: a
    call after the reload neither joins it nor later gets its result from the cache."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "cached.yaml").write_text(yaml.safe_dump({"tools": {"cache_ttl_seconds": {"countdown": 60}}}))
    arguments = {"n": 3, "delay": 0.2}

    def countdowns() -> list[str]:
        return [
            r.headers.get("authorization", "")
            for r in upstreams["acme"].recorder.snapshot()
            if '"name":"countdown"' in r.text.replace(" ", "")
        ]

    async with reloadable_proxy(
        upstreams, tmp_path, rsa_keys, policies_dir=str(policies), cache={"max_bytes": 1 << 20}
    ) as (running, data, path):
        data["tenants"]["acme"]["policy"] = "cached"
        write_config(path, data)
        assert await asyncio.wait_for(reload_config(running.app), 2)
        old_call = asyncio.create_task(call(running, "acme", "countdown", arguments))
        await asyncio.sleep(0.2)
        assert countdowns() == ["Bearer upstream-secret-acme"]
        assert await reload_with(running, data, path, {"headers": {"Authorization": "Bearer rotated-secret"}})
        new_call = await call(running, "acme", "countdown", arguments)  # the old one is still running
        assert new_call[0] == 200
        assert (await old_call)[0] == 200
        assert countdowns() == ["Bearer upstream-secret-acme", "Bearer rotated-secret"]
        assert (await call(running, "acme", "countdown", arguments))[0] == 200
        assert len(countdowns()) == 2  # served from the cache, stored under the new config


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_call_in_flight_while_its_tenant_is_removed_stores_nothing_a_readded_tenant_finds(
    upstreams: dict[str, Any], tmp_path: Path, rsa_keys: Any, request: pytest.FixtureRequest, backend: str
) -> None:
    """Attack pass F9: a cached call in flight while a reload removes its tenant; the tenant id is
    added back (same upstream, same policy); a new call must go upstream, not get the old result."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "cached.yaml").write_text(yaml.safe_dump({"tools": {"cache_ttl_seconds": {"countdown": 60}}}))
    overrides: dict[str, Any] = {"policies_dir": str(policies), "cache": {"max_bytes": 1 << 20}}
    if backend == "redis":
        redis = request.getfixturevalue("redis_server")
        overrides["state"] = {"backend": "redis", "url": redis.url, "key_prefix": f"f9{os.getpid()}"}
    arguments = {"n": 3, "delay": 0.2}

    def countdowns() -> int:
        return sum(
            '"name":"countdown"' in r.text.replace(" ", "") for r in upstreams["acme"].recorder.snapshot()
        )

    async with reloadable_proxy(upstreams, tmp_path, rsa_keys, **overrides) as (running, data, path):
        data["tenants"]["acme"]["policy"] = "cached"
        write_config(path, data)
        assert await asyncio.wait_for(reload_config(running.app), 2)
        old_call = asyncio.create_task(call(running, "acme", "countdown", arguments))
        async with asyncio.timeout(10):
            while countdowns() == 0:  # the call has reached the upstream
                await asyncio.sleep(0.01)
        removed = json.loads(json.dumps(data))
        removed["tenants"].pop("acme")
        write_config(path, removed)
        assert await asyncio.wait_for(reload_config(running.app), 2)
        write_config(path, data)  # acme again, as it was
        assert await asyncio.wait_for(reload_config(running.app), 2)
        await old_call  # it finishes on the runtime it began on
        shared = running.app[SERVICES].shared
        if shared is not None:
            await shared.written()  # whatever it would have stored has landed
        assert (await call(running, "acme", "countdown", arguments))[0] == 200
        assert countdowns() == 2  # asked upstream again: nothing of the removed tenant's was found
        if shared is not None:
            await shared.written()  # (its store has landed: Redis writes leave after the answer)
        assert (await call(running, "acme", "countdown", arguments))[0] == 200
        assert countdowns() == 2  # and the new answer is cached as usual


class HeldStreams:
    """An upstream that answers every 2026-07-28 request with an SSE stream it holds open: one log
    message at once, more each time `emit` is called, and no answer, as a listen stream or a long
    call that keeps reporting does."""

    def __init__(self) -> None:
        self.streams: list[web.StreamResponse] = []
        self.done = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        message = json.loads(await request.read())
        if message.get("method") == "server/discover":
            result = {"supportedVersions": ["2026-07-28"], "capabilities": {}, "serverInfo": {"name": "held"}}
            return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": result})
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        self.streams.append(stream)
        await self.send(stream, "before the reload")
        await self.done.wait()
        return stream

    @staticmethod
    async def send(stream: web.StreamResponse, text: str) -> None:
        note = {
            "jsonrpc": "2.0",
            "method": "notifications/message",
            "params": {"level": "info", "data": text},
        }
        await stream.write(f"event: message\ndata: {json.dumps(note)}\n\n".encode())

    async def emit(self, text: str) -> None:
        for stream in self.streams:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.send(stream, text)


ENDED_BY = {
    "removed": {"code": -32003, "message": "Forbidden: this tenant is no longer served"},
    "moved": {
        "code": -32010,
        "message": "The tenant's MCP server was replaced by a reload; send the request again",
    },
}


@pytest.mark.parametrize("change", ["removed", "moved"])
@pytest.mark.parametrize("method", ["subscriptions/listen", "tools/call"])
async def test_a_removed_tenants_streams_end_at_once_and_relay_nothing_more(
    tmp_path: Path, rsa_keys: Any, method: str, change: str
) -> None:
    """Attack pass F8: a tenant holding a subscriptions/listen stream (or a long call's SSE stream)
    is removed by a reload, or moved to another upstream; the old upstream goes on sending. The
    stream ends at once (removed: with the answer a new request would get, -32003; moved: asking
    for the request again, which goes to the new upstream), and nothing the old upstream sent after
    the reload reaches it."""
    upstream = HeldStreams()
    app = web.Application()
    app.router.add_post("/mcp", upstream.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.2)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}/mcp"
    params: dict[str, Any] = {"_meta": META}
    headers = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": method}
    if method == "tools/call":
        params.update(name="long_report", arguments={})
        headers["Mcp-Name"] = "long_report"
    else:
        params["notifications"] = {"resourcesListChanged": True}
    body = {"jsonrpc": "2.0", "id": 5, "method": method, "params": params}
    try:
        async with reloadable_proxy({"acme": url, "globex": url}, tmp_path, rsa_keys) as (
            running,
            data,
            path,
        ):
            headers.update(Accept=MCP_ACCEPT, Authorization=f"Bearer {running.token('acme')}")
            async with (
                aiohttp.ClientSession() as http,
                http.post(running.url, json=body, headers=headers) as held,
            ):
                assert held.status == 200
                messages = sse_messages(held)
                first = await asyncio.wait_for(anext(messages), 10)
                assert first["params"]["data"] == "before the reload"
                changed = json.loads(json.dumps(data))
                if change == "removed":
                    changed["tenants"].pop("acme")
                else:
                    changed["tenants"]["acme"]["upstream"]["url"] = f"http://127.0.0.1:{free_port()}/mcp"
                write_config(path, changed)
                assert await asyncio.wait_for(reload_config(running.app), 2)
                await upstream.emit("after the reload")
                async with asyncio.timeout(10):  # the upstream never ends it: only the proxy can
                    rest = [message async for message in messages]
        assert rest == [{"jsonrpc": "2.0", "id": 5, "error": ENDED_BY[change]}]
    finally:
        upstream.done.set()
        await runner.cleanup()


async def test_a_reload_forgets_verified_tokens(
    upstreams: dict[str, Any], tmp_path: Path, rsa_keys: Any
) -> None:
    """A token verified under the old config is verified again under the new one: here the issuer
    now requires a scope the token lacks, so the same token that passed a moment ago gets 403."""
    async with reloadable_proxy(upstreams, tmp_path, rsa_keys) as (running, data, path):
        raw = running.token("acme")
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {"name": "whoami", "arguments": {}, "_meta": META}}  # fmt: skip
        headers = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": "whoami"}
        assert (await running.post(body, token=raw, headers=headers))[0] == 200
        after = json.loads(json.dumps(data))
        after["auth"]["issuers"][0]["required_scopes"] = ["notes:admin"]
        write_config(path, after)
        assert await asyncio.wait_for(reload_config(running.app), 2)
        status, response_headers, _ = await running.post(body, token=raw, headers=headers)
        assert status == 403
        assert 'error="insufficient_scope"' in response_headers["WWW-Authenticate"]


async def test_a_removed_tenant_keeps_no_activity_records_even_from_pending_reports(
    upstreams: dict[str, Any], tmp_path: Path, rsa_keys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("proxy.ops.reports.REPORT_DELAY_SECONDS", 60.0)  # the globex call's report waits
    async with reloadable_proxy(upstreams, tmp_path, rsa_keys) as (running, data, path):
        assert (await call(running, "globex"))[0] == 200
        after = json.loads(json.dumps(data))
        after["tenants"].pop("globex")
        write_config(path, after)
        assert await asyncio.wait_for(reload_config(running.app), 2)
        services = running.app[SERVICES]
        services.reports.run_now()
        assert await services.audit.recent("globex", 10) == []


async def test_a_hung_old_upstream_does_not_hold_up_a_reload(
    upstreams: dict[str, Any], tmp_path: Path, rsa_keys: Any
) -> None:
    """The sessions of a tenant moved to a new upstream end upstream in the background: an old
    upstream that never answers the DELETE delays neither the reload nor anyone's requests."""
    async with (
        session_upstream("hung-upstream-session", hang_on_delete=True) as (hung, deletes),
        reloadable_proxy({"acme": hung, "globex": upstreams["globex"]}, tmp_path, rsa_keys) as (
            running, data, path,
        ),
    ):  # fmt: skip
        status, headers, _ = await running.post(HANDSHAKE_INITIALIZE, token=running.token("acme"))
        assert status == 200 and "Mcp-Session-Id" in headers
        assert await reload_with(running, data, path, {"url": upstreams["acme"].url})
        assert (await asyncio.wait_for(call(running, "globex"), 2))[0] == 200
        assert (await asyncio.wait_for(call(running, "acme"), 2))[0] == 200  # on its new upstream
        for _ in range(20):
            if deletes:
                break
            await asyncio.sleep(0.05)
        assert deletes == ["hung-upstream-session"]  # the old session was still ended upstream


async def test_an_initialize_in_flight_across_a_reload_that_moves_the_tenant_leaves_no_session(
    upstreams: dict[str, Any], tmp_path: Path, rsa_keys: Any
) -> None:
    """The session would hold the old upstream's session id and send it to the new upstream."""
    answer_now = asyncio.Event()
    async with (
        session_upstream("old-upstream-session", hold=answer_now) as (slow, deletes),
        reloadable_proxy({"acme": slow, "globex": upstreams["globex"]}, tmp_path, rsa_keys) as (
            running, data, path,
        ),
    ):  # fmt: skip
        pending = asyncio.create_task(running.post(HANDSHAKE_INITIALIZE, token=running.token("acme")))
        await asyncio.sleep(0.2)
        assert await reload_with(running, data, path, {"url": upstreams["acme"].url})
        answer_now.set()
        status, headers, raw = await pending
        assert status == 502
        assert "Mcp-Session-Id" not in headers
        assert "initialize again" in json.loads(raw)["error"]["message"]
        assert len(running.app[SERVICES].sessions) == 0
        assert deletes == ["old-upstream-session"]  # the old upstream's side was ended too
        status, headers, _ = await running.post(HANDSHAKE_INITIALIZE, token=running.token("acme"))
        assert status == 200 and "Mcp-Session-Id" in headers  # on the new upstream


async def test_an_invalid_reload_keeps_the_old_config_serving(
    upstreams: dict[str, Any], tmp_path: Path, rsa_keys: Any, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{free_port()}/mcp"
    path = tmp_path / "proxy.yaml"
    write_config(
        path,
        proxy_config(url, upstreams, tmp_path, rsa_keys, reload={"watch_files": True, "poll_seconds": 0.1}),
    )
    runner, _ = await start_server(load_config(path, env={**os.environ, DEV_SECRET_ENV: DEV_SECRET}))
    running = RunningProxy(url, None, runner.app)
    try:
        path.write_text("listen: [this is not a mapping\n")
        await asyncio.sleep(0.5)  # the file watch notices, validates, refuses
        assert (await call(running, "acme"))[0] == 200
        _, _, text = await get(running.metrics_url)
        assert samples(text, "mcp_proxy_config_reloads_total")[(("result", "invalid"),)] >= 1.0
        assert not await reload_config(runner.app)
        assert (await call(running, "globex"))[0] == 200
    finally:
        await runner.cleanup()


async def test_the_file_watch_follows_the_policy_files_a_reload_names(
    upstreams: dict[str, Any], tmp_path: Path, rsa_keys: Any
) -> None:
    """The watched files are worked out once per config, and again for the config a SIGHUP loads:
    an edit made right after that reload read the files is still noticed, and a policy file that
    only the reloaded config names is watched from then on."""
    url = f"http://127.0.0.1:{free_port()}/mcp"
    path = tmp_path / "proxy.yaml"
    policy = tmp_path / "policies" / "later.yaml"
    policy.parent.mkdir()
    policy.write_text(yaml.safe_dump({"tools": {"deny": []}}))
    data = proxy_config(
        url, upstreams, tmp_path, rsa_keys, policies_dir=str(policy.parent),
        reload={"watch_files": True, "poll_seconds": 1.0},
    )  # fmt: skip
    write_config(path, data)
    runner, _ = await start_server(load_config(path, env={**os.environ, DEV_SECRET_ENV: DEV_SECRET}))
    running = RunningProxy(url, None, runner.app)

    async def denial_becomes(expected: bool) -> bool:
        for _ in range(60):
            answer = (await call(running, "acme"))[1]
            denied: bool = answer.get("error", {}).get("code") == -32005  # a refusal is an answer (HTTP 200)
            if denied == expected:
                break
            await asyncio.sleep(0.05)
        return denied

    try:
        await asyncio.sleep(0.3)
        data["tenants"]["acme"]["policy"] = "later"
        write_config(path, data)
        assert await asyncio.wait_for(reload_config(runner.app), 2)  # as SIGHUP does
        policy.write_text(yaml.safe_dump({"tools": {"deny": ["whoami"]}}))  # before the next poll
        assert await denial_becomes(True), "an edit right after a reload was missed"
        await asyncio.sleep(0.1)
        policy.write_text(yaml.safe_dump({"tools": {"deny": []}}))
        assert not await denial_becomes(False), "the reloaded config's policy file is not watched"
        assert (await call(running, "globex"))[0] == 200
    finally:
        await runner.cleanup()


async def test_one_edit_noticed_by_both_sighup_and_the_file_watch_reloads_once(
    upstreams: dict[str, Any], tmp_path: Path, rsa_keys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whichever notices an edit first reloads; the other finds nothing new, in either order."""
    import proxy.ops.reload as reload_module

    looks = 0
    real_stamps = reload_module.stamps

    def counted_stamps(files: list[Path]) -> Any:
        nonlocal looks
        looks += 1
        return real_stamps(files)

    monkeypatch.setattr(reload_module, "stamps", counted_stamps)
    url = f"http://127.0.0.1:{free_port()}/mcp"
    path = tmp_path / "proxy.yaml"
    data = proxy_config(
        url, upstreams, tmp_path, rsa_keys, reload={"watch_files": True, "poll_seconds": 0.05}
    )
    write_config(path, data)
    runner, _ = await start_server(load_config(path, env={**os.environ, DEV_SECRET_ENV: DEV_SECRET}))
    running = RunningProxy(url, None, runner.app)

    async def reloads() -> float:
        _, _, text = await get(running.metrics_url)
        return samples(text, "mcp_proxy_config_reloads_total").get((("result", "ok"),), 0.0)

    async def watch_looks_again() -> None:
        """Until the file watch has compared the files several more times."""
        target = looks + 6
        for _ in range(400):
            if looks >= target:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the file watch stopped looking")

    try:
        globex = data["tenants"].pop("globex")
        write_config(path, data)
        await reload_config(runner.app, only_if_changed=True)  # SIGHUP, racing the file watch
        await watch_looks_again()
        assert (await call(running, "globex"))[0] == 403
        assert await reloads() == 1.0

        data["tenants"]["globex"] = globex
        write_config(path, data)
        for _ in range(400):  # this time the file watch reloads first ...
            if (await call(running, "globex"))[0] == 200:
                break
            await asyncio.sleep(0.02)
        assert not await reload_config(runner.app, only_if_changed=True)  # ... and SIGHUP finds nothing new
        await watch_looks_again()
        assert await reloads() == 2.0
    finally:
        await runner.cleanup()


# --- SIGTERM -----------------------------------------------------------------------------------


async def test_sigterm_while_streaming_drains_closes_streams_and_exits_0(
    upstreams: dict[str, Any], tmp_path: Path, rsa_keys: Any
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    path = tmp_path / "proxy.yaml"
    write_config(path, proxy_config(url, upstreams, tmp_path, rsa_keys))
    env = {**os.environ, DEV_SECRET_ENV: DEV_SECRET}
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "--config", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    running = RunningProxy(url, None, None)  # type: ignore[arg-type]
    try:
        for _ in range(100):
            try:
                if (await get(f"http://127.0.0.1:{port}/healthz"))[0] == 200:
                    break
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
        status, headers, _ = await running.post(HANDSHAKE_INITIALIZE, token=running.token("acme"))
        assert status == 200
        session = headers["Mcp-Session-Id"]
        auth = {"Authorization": f"Bearer {running.token('acme')}", "Mcp-Session-Id": session,
                "MCP-Protocol-Version": "2025-11-25"}  # fmt: skip
        async with aiohttp.ClientSession() as http:
            stream = await http.get(url, headers={**auth, "Accept": "text/event-stream"})
            assert stream.status == 200
            slow_body = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                         "params": {"name": "countdown", "arguments": {"n": 3, "delay": 0.2}}}  # fmt: skip
            slow = asyncio.create_task(http.post(url, json=slow_body, headers={**auth, "Accept": MCP_ACCEPT}))
            await asyncio.sleep(0.2)
            process.send_signal(signal.SIGTERM)
            rest = await asyncio.wait_for(stream.content.read(), 5)  # the GET stream ends cleanly
            assert stream.status == 200
            del rest
            answer = await asyncio.wait_for(slow, 5)
            text = await answer.text()
            assert answer.status == 200
            assert '"done":3' in text  # the request in flight finished before the exit
        code = await asyncio.to_thread(process.wait, 15)
        assert code == 0
        assert any(
            r.method == "DELETE" for r in upstreams["acme"].recorder.snapshot()
        )  # sessions ended upstream
        assert process.stderr is not None
        log_lines = [
            json.loads(line) for line in process.stderr.read().decode().splitlines() if line.startswith("{")
        ]
        requests = [line for line in log_lines if line.get("event") == "mcp_request"]
        assert requests
        assert all(line.get("request_id") and line.get("tenant") == "acme" for line in requests)
    finally:
        if process.poll() is None:
            process.kill()


async def test_sighup_reloads_a_running_process(
    upstreams: dict[str, Any], tmp_path: Path, rsa_keys: Any
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    path = tmp_path / "proxy.yaml"
    config = proxy_config(url, upstreams, tmp_path, rsa_keys, reload={"watch_files": False})
    write_config(path, config)
    log_file = tmp_path / "proxy.log"
    with log_file.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(path)],
            stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, DEV_SECRET_ENV: DEV_SECRET},
        )  # fmt: skip

    def logged(event: str) -> int:
        return sum(f'"event":"{event}"' in line for line in log_file.read_text().splitlines())

    running = RunningProxy(url, None, None)  # type: ignore[arg-type]
    try:
        for _ in range(100):
            try:
                if (await get(f"http://127.0.0.1:{port}/healthz"))[0] == 200:
                    break
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
        assert (await call(running, "globex"))[0] == 200
        del config["tenants"]["globex"]
        write_config(path, config)
        process.send_signal(signal.SIGHUP)
        for _ in range(50):
            status, _ = await call(running, "globex")
            if status == 403:
                break
            await asyncio.sleep(0.05)
        assert status == 403
        assert (await call(running, "acme"))[0] == 200
        process.send_signal(signal.SIGHUP)  # nothing changed since: no second reload
        for _ in range(100):
            if logged("reload_skipped"):
                break
            await asyncio.sleep(0.05)
        assert (logged("reload_skipped"), logged("reloaded")) == (1, 1)
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 15) == 0
