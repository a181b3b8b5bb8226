"""THREATS G under load, and session churn: many tenants at once, nothing crosses, nothing leaks.

Twenty tenants, each with its own SDK upstream answering with its own canary, five clients each,
all at once: the real SDK client in both eras, raw clients that disconnect mid-stream and resume
a stream with Last-Event-ID, SDK calls cancelled mid-flight. No response and no audit file may
hold another tenant's canary, and once the clients are gone the proxy's tasks, its upstream
connections in use and its session registry are back where they started.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import re
import secrets
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import proxy.layers.containment.audit as proxy_audit
from proxy.http.keys import RUNTIME, SERVICES
from proxy.layers.sessions.registry import Session
from tests.adversarial.test_d_sessions import sdk_client
from tests.conftest import MCP_ACCEPT, RunningProxy, StartProxy
from tests.e2e.test_transport_e2e import (
    HANDSHAKE,
    call_body,
    initialize,
    modern_headers,
    session_headers,
    sse_messages,
    text_of,
)
from tests.upstreams import TOOL_EVENTS, Upstream, start_test_upstream

pytestmark = pytest.mark.e2e

FLEET = tuple(f"t{i:02d}" for i in range(20))
CLIENTS_PER_TENANT = 5
# Where a request body names a tenant: the tenant_id argument, a notes:// URI, a watched tag.
NAMED_TENANT = re.compile(r'"tenant_id":\s*"([^"]*)"|notes://([^/"]*)/|"tag":\s*"([^"-]*)-')


@pytest.fixture(scope="module")
def fleet(upstream_runner: Any) -> dict[str, Upstream]:
    """One resumable SDK notes upstream per tenant, each with its own canary."""
    return {
        tenant: start_test_upstream(
            upstream_runner, tenant, f"CANARY-{tenant}-{secrets.token_hex(6)}", resumable=True
        )
        for tenant in FLEET
    }


# --- what the proxy holds ---------------------------------------------------------------------------


def runtime_of(running: RunningProxy) -> Any:
    held = running.app[RUNTIME]
    return getattr(held, "current", held)  # a reference to the current runtime, or the runtime itself


def upstream_connections_in_use(running: RunningProxy) -> int:
    """Connections the tenants' upstream pools have handed out and not had back.

    A pool counts every connection a request holds (while connecting included) until the response
    is released or closed; idle keep-alive connections are not in use. A response the proxy forgot
    to close stays in use forever, so this is the count that must return to its baseline.
    """
    return sum(getattr(t.upstream, "connections_in_use", 0) for t in runtime_of(running).tenants)


async def settle(measure: Callable[[], int], target: int, timeout: float = 5.0) -> int:
    """Wait until `measure()` is at most `target` (or the timeout passes); returns the last value."""
    deadline = time.monotonic() + timeout
    value = measure()
    while value > target and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        value = measure()
    return value


def task_count() -> int:
    return len(asyncio.all_tasks())


async def steady_task_count(timeout: float = 3.0) -> int:
    """The task count once start-up work (and any short periodic burst) has finished."""
    deadline = time.monotonic() + timeout
    samples = [task_count()]
    while time.monotonic() < deadline and (len(samples) < 4 or len(set(samples[-4:])) > 1):
        await asyncio.sleep(0.05)
        samples.append(task_count())
    return min(samples[-4:])


async def wait_for_events(tag: str, event: str, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while event not in TOOL_EVENTS.get(tag, []) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return TOOL_EVENTS.get(tag, [])


# --- the five kinds of client -------------------------------------------------------------------


class Tenant:
    """One tenant's clients' view: everything they were sent, and the watched calls they cancelled."""

    def __init__(self, running: RunningProxy, tenant: str, canary: str) -> None:
        self.running = running
        self.id = tenant
        self.canary = canary
        self.token = running.token(tenant, f"user-{tenant}")
        self.seen: list[str] = []
        self.cancelled_tags: list[str] = []

    def headers(self, **extra: str) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.token}",
            "Accept": MCP_ACCEPT,
            "Content-Type": "application/json",
            **extra,
        }

    def check_whoami(self, text: str) -> None:
        who = json.loads(text)
        assert (who["server_tenant"], who["canary"]) == (self.id, self.canary)


async def sdk_client_session(t: Tenant, mode: str, index: int) -> None:
    """tools/call, resources/read and a progress-reporting call through the SDK client."""
    progress: list[str] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(f"{value}/{total} {message}")

    async with sdk_client(t.running.url, t.token, mode) as client:
        who = text_of(await client.call_tool("whoami", {}))
        t.seen.append(who)
        t.check_whoami(who)
        note = f"note {index} of {t.id}"
        t.seen.append(text_of(await client.call_tool("add_note", {"tenant_id": t.id, "text": note})))
        notes = text_of(await client.call_tool("list_notes", {"tenant_id": t.id}))
        t.seen.append(notes)
        assert note in notes and t.canary in notes
        resource = await client.read_resource(f"notes://{t.id}/plan")
        text = resource.contents[0].text
        t.seen.append(text)
        assert t.canary in text
        done = await client.call_tool("countdown", {"n": 3, "delay": 0.02}, progress_callback=on_progress)
        t.seen.append(text_of(done))
        t.seen.extend(progress)
        assert json.loads(text_of(done)) == {"done": 3, "canary": t.canary}
        assert len(progress) == 3
        if mode == "legacy":
            prompt = await client.get_prompt("summarize_notes", {"tenant_id": t.id})
            t.seen.append(prompt.messages[0].content.text)


async def sdk_cancelled_call(t: Tenant, mode: str) -> None:
    """An SDK call whose asyncio task is cancelled mid-stream; the client then carries on."""
    tag = f"{t.id}-sdk-{secrets.token_hex(4)}"
    started = asyncio.Event()

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        started.set()

    async with sdk_client(t.running.url, t.token, mode) as client:
        call = asyncio.create_task(
            client.call_tool(
                "watched_countdown", {"tag": tag, "n": 100, "delay": 0.05}, progress_callback=on_progress
            )
        )
        await asyncio.wait_for(started.wait(), 15)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        assert call.cancelled()
        t.cancelled_tags.append(tag)
        who = text_of(await client.call_tool("whoami", {}))
        t.seen.append(who)
        t.check_whoami(who)


async def raw_modern_disconnect(t: Tenant) -> None:
    """A raw modern call closed after its first progress event, then a normal call."""
    tag = f"{t.id}-raw-{secrets.token_hex(4)}"
    body = call_body("watched_countdown", {"tag": tag, "n": 100, "delay": 0.05})
    body["params"]["_meta"]["progressToken"] = "p"
    async with aiohttp.ClientSession() as http:
        response = await http.post(
            t.running.url,
            data=json.dumps(body),
            headers=t.headers(**modern_headers("tools/call", "watched_countdown")),
        )
        try:
            assert response.status == 200
            first = await asyncio.wait_for(anext(sse_messages(response)), 15)
            t.seen.append(json.dumps(first))
            assert first["method"] == "notifications/progress"
        finally:
            response.close()  # the client goes away mid-stream
        t.cancelled_tags.append(tag)
        async with http.post(
            t.running.url,
            data=json.dumps(call_body("whoami", {})),
            headers=t.headers(**modern_headers("tools/call", "whoami")),
        ) as response:
            raw = await response.text()
            t.seen.append(raw)
            assert response.status == 200
            t.check_whoami(json.loads(raw)["result"]["content"][0]["text"])


async def raw_handshake_resumption(t: Tenant) -> None:
    """A raw session: a streamed call, then a GET resuming that stream after its first progress."""
    session_id = await initialize(t.running, t.token)
    body = {
        "jsonrpc": "2.0",
        "id": 41,
        "method": "tools/call",
        "params": {"name": "countdown", "arguments": {"n": 3, "delay": 0}, "_meta": {"progressToken": "r"}},
    }
    async with aiohttp.ClientSession() as http:
        async with http.post(
            t.running.url, data=json.dumps(body), headers=t.headers(**session_headers(session_id))
        ) as response:
            assert response.status == 200
            raw = await response.text()
            t.seen.append(raw)
        ids = [line[3:].strip() for line in raw.splitlines() if line.startswith("id:")]
        assert len(ids) == 5  # priming, three progress events, the answer
        assert t.canary in raw
        get = {
            "Authorization": f"Bearer {t.token}",
            "Accept": "text/event-stream",
            "Last-Event-ID": ids[1],
            **session_headers(session_id),
        }
        replayed: list[dict[str, Any]] = []
        async with http.get(t.running.url, headers=get) as response:
            assert response.status == 200
            async with asyncio.timeout(10):
                async for message in sse_messages(response):
                    replayed.append(message)
                    if message.get("params", {}).get("progress") == 3:
                        break  # (the replayed answer itself: tests/adversarial/test_d_sessions.py)
        t.seen.append(json.dumps(replayed))
        assert [(m["method"], m["params"]["progress"]) for m in replayed] == [
            ("notifications/progress", 2),
            ("notifications/progress", 3),
        ]
        async with http.delete(
            t.running.url, headers={"Authorization": f"Bearer {t.token}", **session_headers(session_id)}
        ) as response:
            assert response.status == 200


def tenant_clients(t: Tenant, index: int) -> list[Any]:
    even = index % 2 == 0
    return [
        sdk_client_session(t, "auto", 0),
        sdk_client_session(t, "legacy", 1),
        sdk_cancelled_call(t, "legacy" if even else "auto"),
        raw_modern_disconnect(t),
        raw_handshake_resumption(t),
    ]


async def test_twenty_tenants_five_clients_each_nothing_crosses_nothing_leaks(
    fleet: dict[str, Upstream], make_proxy: StartProxy, tmp_path: Path
) -> None:
    for upstream in fleet.values():
        upstream.recorder.clear()
    audit_dir = tmp_path / "audit"
    running = await make_proxy(fleet, audit={"dir": str(audit_dir)})
    registry = running.app[SERVICES].sessions
    tasks_before = await steady_task_count()
    connections_before = upstream_connections_in_use(running)
    assert connections_before == 0

    tenants = [Tenant(running, tenant, fleet[tenant].canary) for tenant in FLEET]
    peak = 0

    async def sample_connections() -> None:
        nonlocal peak
        while True:
            peak = max(peak, upstream_connections_in_use(running))
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample_connections())
    started = time.monotonic()
    try:
        clients = [client for i, t in enumerate(tenants) for client in tenant_clients(t, i)]
        assert len(clients) == len(FLEET) * CLIENTS_PER_TENANT
        outcomes = await asyncio.gather(*clients, return_exceptions=True)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    failures = [repr(o) for o in outcomes if isinstance(o, BaseException)]
    assert not failures, failures[:5]
    elapsed = time.monotonic() - started
    assert peak >= len(FLEET)  # the load really was concurrent, and the measure counts it

    # Zero foreign canaries in anything any client was sent.
    canaries = {t.id: t.canary for t in tenants}
    for t in tenants:
        everything = "\n".join(t.seen)
        assert t.canary in everything
        leaked = [other for other, canary in canaries.items() if other != t.id and canary in everything]
        assert not leaked, f"{t.id} saw the canaries of {leaked}"

    # Nothing misrouted on the way in either: each upstream saw only its own tenant named.
    for t in tenants:
        received = "\n".join(r.text for r in fleet[t.id].recorder.snapshot())
        named = {a or b or c for a, b, c in NAMED_TENANT.findall(received)}
        assert named == {t.id}, (t.id, named)

    # Every cancelled call was really cancelled upstream, not left to run.
    for t in tenants:
        assert len(t.cancelled_tags) == 2
        for tag in t.cancelled_tags:
            events = await wait_for_events(tag, "cancelled")
            assert "cancelled" in events, (tag, events)
            assert "finished" not in events

    # The audit files: one per tenant, its own records only, and no canary (never content).
    running.app[SERVICES].flush()
    files = sorted(p.name for p in audit_dir.iterdir())
    assert files == sorted(f"{t}.jsonl" for t in FLEET)
    for t in tenants:
        text = (audit_dir / f"{t.id}.jsonl").read_text()
        assert not [canary for canary in canaries.values() if canary in text]
        records = [json.loads(line) for line in text.splitlines()]
        assert len(records) >= 20
        assert {r["tenant"] for r in records} == {t.id}
        assert {r["subject"] for r in records} == {f"user-{t.id}"}

    # Back to the baseline: sessions, tasks, upstream connections in use.
    assert await settle(lambda: len(registry), 0) == 0
    assert all(registry.count(t) == 0 for t in FLEET)
    assert await settle(task_count, tasks_before) == tasks_before, [
        repr(task) for task in asyncio.all_tasks()
    ][:10]
    assert await settle(lambda: upstream_connections_in_use(running), connections_before) == 0
    assert elapsed < 30, elapsed


# --- session churn -------------------------------------------------------------------------------


CHURN_SESSIONS = 320
CHURN_WORKERS = 8
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": HANDSHAKE,
        "capabilities": {},
        "clientInfo": {"name": "churn", "version": "0"},
    },
}


def live_sessions() -> int:
    return sum(1 for obj in gc.get_objects() if isinstance(obj, Session))


def proxy_lines_grown(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot) -> list[tuple[str, int]]:
    """(line, blocks gained) for every line of the proxy package (the innermost frame) whose live
    allocations grew, most first."""
    package = str(Path(proxy_audit.__file__).parent / "*")
    only_proxy = [tracemalloc.Filter(True, package)]
    stats = after.filter_traces(only_proxy).compare_to(before.filter_traces(only_proxy), "lineno")
    return sorted(((str(s.traceback), s.count_diff) for s in stats if s.count_diff > 0), key=lambda x: -x[1])


async def churn(running: RunningProxy, sessions: int) -> list[str]:
    """Open (initialize) and end (DELETE) `sessions` sessions, alternating acme and globex."""
    ids: list[str] = []

    async def worker(first: int) -> None:
        async with aiohttp.ClientSession() as http:
            for i in range(first, sessions, CHURN_WORKERS):
                headers = {
                    "Authorization": f"Bearer {running.token(('acme', 'globex')[i % 2])}",
                    "Accept": MCP_ACCEPT,
                    "Content-Type": "application/json",
                }
                async with http.post(running.url, data=json.dumps(INITIALIZE), headers=headers) as response:
                    assert response.status == 200
                    assert "serverInfo" in await response.text()
                    session_id = response.headers["Mcp-Session-Id"]
                async with http.delete(
                    running.url, headers={**headers, **session_headers(session_id)}
                ) as response:
                    assert response.status == 200
                ids.append(session_id)

    await asyncio.gather(*(worker(n) for n in range(CHURN_WORKERS)))
    return ids


async def test_session_churn_leaves_no_session_task_or_memory_behind(
    proxy: RunningProxy, upstreams: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, audit = proxy.app[SERVICES].sessions, proxy.app[SERVICES].audit
    # The audit keeps each tenant's latest records for proxy_recent_activity, by design: shrink
    # that ring to one record, so that its filling up cannot pass for (or hide) a leak.
    monkeypatch.setattr(proxy_audit, "RECENT_PER_TENANT", 1)
    audit.forget(["acme", "globex"])
    await churn(proxy, 40)  # warm up: lazy pools, catalogs and interned strings exist from here on
    gc.collect()
    tasks_before = await steady_task_count()
    # Sessions of earlier tests' apps may still be alive (aiohttp caches apps; a replica on Redis
    # keeps its views of shared sessions when it stops): only this proxy's are counted.
    sessions_before = live_sessions()
    assert len(registry) == 0
    for upstream in upstreams.values():
        upstream.recorder.clear()

    tracemalloc.start(1)
    try:
        before = tracemalloc.take_snapshot()
        ids = await churn(proxy, CHURN_SESSIONS)
        await settle(task_count, tasks_before)
        proxy.app[SERVICES].reports.run_now()  # a report pending for a moment holds its exchange
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()

    assert len(set(ids)) == CHURN_SESSIONS  # every session was a new one
    assert len(registry) == 0
    assert registry.count("acme") == registry.count("globex") == 0
    assert live_sessions() == sessions_before  # no Session object outlives its DELETE
    assert task_count() == tasks_before, [repr(task) for task in asyncio.all_tasks()][:5]
    assert upstream_connections_in_use(proxy) == 0
    # Both sides ended: every upstream session the churn opened got its DELETE, once.
    for tenant, upstream in upstreams.items():
        records = upstream.recorder.snapshot()
        assert sum(1 for r in records if r.method == "POST") == CHURN_SESSIONS // 2, tenant
        deleted = [r.headers["mcp-session-id"] for r in records if r.method == "DELETE"]
        assert len(set(deleted)) == len(deleted) == CHURN_SESSIONS // 2, tenant
    # Memory held by the proxy's own code. Anything kept per session (a registry that never
    # forgets, a per-session map never emptied) leaves at least one live block per session at the
    # line that made it: hundreds at one line. Noise (pools, counters, interned strings) leaves a few
    # blocks per line whatever the number of sessions, so a count, not a byte total, tells them apart.
    grown = proxy_lines_grown(before, after)
    assert not grown or grown[0][1] < CHURN_SESSIONS // 4, grown[:5]
