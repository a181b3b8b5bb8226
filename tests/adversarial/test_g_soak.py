"""THREATS G as a soak (`pytest -m soak`, `--soak-seconds N`, default 25): fifty tenants at once.

Fifty tenants, each with its own real SDK upstream answering with its own canary and its own
policy (tenant arguments refused or rewritten, hidden from the schema, a cached read-only tool,
tenant-scoped resource URIs), three clients each, for the time budget: the SDK client in both eras
(tools/list, cached and uncached calls, own and foreign tenant ids, own and foreign resources,
prompts and completions), raw modern calls pinning the exact answers, handshake-era streams
resumed with Last-Event-ID, calls cancelled by closing the stream and by cancelling the SDK call.
Midway one tenant's upstream process is SIGKILLed and, a few seconds later, started again on the
same port.

Then: no foreign canary in any response, cache entry or audit file (and no canary at all in the
audit, which holds summaries only); no upstream was sent another tenant's id; every cancelled call
was cancelled upstream; no tenant but the killed one saw a single error, and the killed one saw
errors only around its outage and was served again after the restart. The figures (requests
served, errors by tenant kind, ...) are printed and written to `soak-report.json` in the test's
tmp dir, before the assertions, so a failing run still reports.

Also here, outside the soak (it runs by default): the regression test for the circuit-breaker bug
found while building it (`test_a_half_open_circuit_whose_trial_never_reaches_the_upstream_still_closes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from mcp import MCPError
from mcp_types import PromptReference
from prometheus_client.parser import text_string_to_metric_families

from proxy.http.keys import SERVICES
from proxy.layers.cache.store import ResponseCache
from tests.adversarial.test_d_sessions import sdk_client
from tests.conftest import RunningProxy, StartProxy
from tests.e2e.test_concurrency_e2e import (
    NAMED_TENANT,
    Tenant,
    raw_handshake_resumption,
    raw_modern_disconnect,
    sdk_cancelled_call,
)
from tests.e2e.test_transport_e2e import call_body, error_of, modern_body, modern_headers, text_of
from tests.upstreams import (
    TOOL_EVENTS,
    Upstream,
    UpstreamProcess,
    free_port,
    is_era_probe,
    start_test_upstream,
)

pytestmark = pytest.mark.e2e

FLEET = tuple(f"s{i:02d}" for i in range(50))
KILLED = "s13"  # its upstream runs in a process of its own, killed and restarted midway
CLIENTS_PER_TENANT = 3
MAX_IN_FLIGHT = 30  # scenarios running at once, all tenants together: what two cores cope with
MAX_SCENARIOS_PER_CLIENT = 500  # a bound on the count as well as on the time
SCENARIO_TIMEOUT = 20.0  # a scenario that takes longer is an error (a hang, not slowness)
REGIONS = ("emea", "apac", "amer")
# Every canary of the fleet has this form, so one pattern finds anyone's canary in any bytes.
CANARY = re.compile(r"SOAK-CANARY-[a-z0-9]+-[0-9a-f]{12}")
# The killed tenant runs with a circuit breaker: it opens during the outage and must close again
# once the upstream is back (a half-open trial answered locally never keeps it open).
KILLED_TENANT_LIMITS: dict[str, Any] = {"circuit_failures": 3, "circuit_open_seconds": 1.0}
# After the restart (plus this), the killed tenant's new scenarios must all succeed. A call that was
# in flight across the restart may still fail just after it and reopen the circuit for
# circuit_open_seconds; on two loaded cores that failure can come a second or so late.
RECOVERY_GRACE = KILLED_TENANT_LIMITS["circuit_open_seconds"] + 2.0


def soak_policy(on_mismatch: str) -> dict[str, Any]:
    return {
        "tenant_arguments": {"names": ["tenant_id"], "on_mismatch": on_mismatch, "hide_from_schema": True},
        "tools": {"cache_ttl_seconds": {"whoami": 600, "region_report": 600}},
        "resources": {"tenant_uri_templates": ["notes://{tenant}/{path}"]},
    }


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`soak_seconds` from --soak-seconds, with a pytest-timeout to match (the default is 120 s)."""
    if "soak_seconds" in metafunc.fixturenames:
        seconds = float(metafunc.config.getoption("--soak-seconds"))
        marks = [pytest.mark.timeout(seconds + 240)]
        metafunc.parametrize("soak_seconds", [pytest.param(seconds, id=f"{seconds:g}s", marks=marks)])


# --- what the clients were sent, scanned as it arrives --------------------------------------------


class Sightings:
    """Stands in for `Tenant.seen`: each text is scanned for canaries as it arrives, not kept."""

    def __init__(self, canary: str) -> None:
        self.canary = canary
        self.own = 0
        self.foreign: list[str] = []
        self.bytes = 0

    def append(self, text: str) -> None:
        self.bytes += len(text)
        for found in CANARY.findall(text):
            if found == self.canary:
                self.own += 1
            else:
                self.foreign.append(found)

    def extend(self, texts: Any) -> None:
        for text in texts:
            self.append(text)


@dataclass
class Outcome:
    scenario: str
    started: float
    ended: float
    error: str | None = None


class SoakTenant(Tenant):
    """A tenant's clients: what they saw, how each scenario ended, which calls they cancelled."""

    def __init__(self, running: RunningProxy, tenant: str, canary: str, on_mismatch: str) -> None:
        super().__init__(running, tenant, canary)
        self.sightings = Sightings(canary)
        self.seen = self.sightings  # type: ignore[assignment]
        self.on_mismatch = on_mismatch
        self.outcomes: list[Outcome] = []
        self.random = random.Random(tenant)
        self.minted = time.monotonic()

    def other(self) -> str:
        return self.random.choice([t for t in FLEET if t != self.id])

    def fresh_token(self) -> None:
        """Tokens live 600 s: a long soak re-mints them."""
        if time.monotonic() - self.minted > 300:
            self.token = self.running.token(self.id, f"user-{self.id}")
            self.minted = time.monotonic()

    def errors(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is not None]


async def refusal(call: Awaitable[Any]) -> Any:
    """The JSON-RPC error an SDK call was refused with (AssertionError when it was answered)."""
    try:
        await call
    except MCPError as refused:
        return refused.error
    raise AssertionError("the call was answered, not refused")


# --- the scenarios --------------------------------------------------------------------------------


async def sdk_mixed(t: SoakTenant, mode: str) -> None:
    """The SDK client: listing, cached and uncached calls, own and foreign tenant ids and resources."""
    other = t.other()
    async with sdk_client(t.running.url, t.token, mode) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert "tenant_id" not in tools["add_note"].input_schema.get("properties", {})  # hidden
        who = text_of(await client.call_tool("whoami", {}))  # cached after the tenant's first
        t.seen.append(who)
        t.check_whoami(who)
        region = t.random.choice(REGIONS)
        report = text_of(await client.call_tool("region_report", {"region": region}))  # cached
        t.seen.append(report)
        assert json.loads(report) == {"region": region, "canary": t.canary}
        note = f"note {secrets.token_hex(3)} of {t.id}"
        added = text_of(await client.call_tool("add_note", {"text": note}))  # the proxy fills tenant_id
        t.seen.append(added)
        assert json.loads(added)["tenant_id"] == t.id
        own = text_of(await client.call_tool("list_notes", {"tenant_id": t.id}))
        t.seen.append(own)
        assert note in own and t.canary in own
        if t.on_mismatch == "reject":
            error = await refusal(client.call_tool("list_notes", {"tenant_id": other}))
            t.seen.append(error.message)
            assert error.code == -32005
            assert other not in error.message
        else:
            spoofed = text_of(await client.call_tool("list_notes", {"tenant_id": other}))
            t.seen.append(spoofed)
            assert json.loads(spoofed)["tenant_id"] == t.id
        resource = await client.read_resource(f"notes://{t.id}/plan")
        text = resource.contents[0].text
        t.seen.append(text)
        assert t.canary in text
        t.seen.append((await refusal(client.read_resource(f"notes://{other}/plan"))).message)
        if mode == "legacy":
            prompt = await client.get_prompt("summarize_notes", {"topic": "soak"})
            prompt_text = prompt.messages[0].content.text
            t.seen.append(prompt_text)
            assert f"notes of {t.id} about soak" in prompt_text
            completion = await client.complete(
                PromptReference(type="ref/prompt", name="summarize_notes"), {"name": "tenant_id", "value": ""}
            )
            assert completion.completion.values == [t.id]  # answered by the proxy: the caller only


async def raw_modern_mixed(t: SoakTenant) -> None:
    """Raw modern requests whose exact answers are pinned: cache hits, refusals, rewrites."""
    other = t.other()
    async with aiohttp.ClientSession() as http:

        async def post(body: dict[str, Any], method: str, name: str, **extra: str) -> tuple[int, Any]:
            headers = t.headers(**modern_headers(method, name, **extra))
            async with http.post(t.running.url, data=json.dumps(body), headers=headers) as response:
                raw = await response.text()
                t.seen.append(raw)
                return response.status, json.loads(raw)

        for _ in range(2):  # the second one at the latest is a cache hit
            status, answer = await post(call_body("whoami", {}), "tools/call", "whoami")
            assert status == 200, answer
            t.check_whoami(answer["result"]["content"][0]["text"])
        region = t.random.choice(REGIONS)
        status, answer = await post(
            call_body("region_report", {"region": region}),
            "tools/call",
            "region_report",
            **{"Mcp-Param-Region": region},
        )
        assert (status, answer["result"]["structuredContent"]) == (
            200,
            {"region": region, "canary": t.canary},
        )
        status, answer = await post(call_body("list_notes", {"tenant_id": other}), "tools/call", "list_notes")
        if t.on_mismatch == "reject":
            assert (status, answer["error"]["code"]) == (200, -32005), answer
            assert other not in answer["error"]["message"]
        else:
            assert status == 200, answer
            assert answer["result"]["structuredContent"]["tenant_id"] == t.id
        for owner in (t.id, other):
            uri = f"notes://{owner}/diary"
            status, answer = await post(modern_body("resources/read", {"uri": uri}), "resources/read", uri)
            if owner == t.id:
                assert status == 200, answer
                assert t.canary in answer["result"]["contents"][0]["text"]
            else:  # exactly what the upstream says of a resource it does not have
                assert (status, answer["error"]["code"]) == (400, -32602), answer
                assert answer["error"]["message"] == f"Unknown resource: {uri}"


async def sdk_cancel(t: SoakTenant) -> None:
    await sdk_cancelled_call(t, t.random.choice(["auto", "legacy"]))


Scenario = Callable[[SoakTenant], Awaitable[None]]
SCENARIOS: list[tuple[str, Scenario]] = [
    ("sdk-auto", lambda t: sdk_mixed(t, "auto")),
    ("raw-modern", raw_modern_mixed),
    ("resume", raw_handshake_resumption),
    ("sdk-legacy", lambda t: sdk_mixed(t, "legacy")),
    ("disconnect", raw_modern_disconnect),
    ("sdk-cancel", sdk_cancel),
]


def describe(error: BaseException) -> str:
    """The first line of the innermost first exception (the SDK wraps them in groups)."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return f"{type(error).__name__}: {str(error).partition(chr(10))[0]}"[:200]


# --- the fleet ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def soak_fleet(upstream_runner: Any) -> Iterator[dict[str, Any]]:
    """Forty-nine resumable SDK upstreams on the shared thread, and KILLED's in its own process."""
    killable = UpstreamProcess(KILLED, f"SOAK-CANARY-{KILLED}-{secrets.token_hex(6)}")
    killable.spawn()  # it starts while the others do
    try:
        fleet: dict[str, Any] = {
            tenant: start_test_upstream(
                upstream_runner, tenant, f"SOAK-CANARY-{tenant}-{secrets.token_hex(6)}", resumable=True
            )
            for tenant in FLEET
            if tenant != KILLED
        }
        killable.wait_until_listening()
        fleet[KILLED] = killable
        yield fleet
    finally:
        killable.kill()


def metric_samples(running: RunningProxy, name: str) -> list[tuple[dict[str, str], float]]:
    running.app[SERVICES].reports.run_now()
    text = running.app[SERVICES].metrics.render().decode()
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def cache_entries(running: RunningProxy) -> list[tuple[Any, bytes]]:
    """Every entry in the response cache, expired-but-not-yet-evicted ones included."""
    cache = running.app[SERVICES].cache
    assert isinstance(cache, ResponseCache)
    return [(key, entry.result) for key, entry in cache.entries(stale=True)]


# --- the soak -------------------------------------------------------------------------------------


@pytest.mark.soak
async def test_fifty_tenants_under_load_with_an_upstream_killed_midway(
    soak_fleet: dict[str, Any],
    make_proxy: StartProxy,
    tmp_path: Path,
    soak_seconds: float,
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_started = time.monotonic()
    for upstream in soak_fleet.values():
        if isinstance(upstream, Upstream):
            upstream.recorder.clear()
    killable: UpstreamProcess = soak_fleet[KILLED]
    modes = {tenant: ("reject", "rewrite")[index % 2] for index, tenant in enumerate(FLEET)}
    audit_dir = tmp_path / "audit"
    running = await make_proxy(
        soak_fleet,
        policies={tenant: soak_policy(modes[tenant]) for tenant in FLEET},
        tenants={
            tenant: {
                "upstream": {"url": upstream.url},
                **({"limits": KILLED_TENANT_LIMITS} if tenant == KILLED else {}),
            }
            for tenant, upstream in soak_fleet.items()
        },
        audit={"dir": str(audit_dir)},
    )
    tenants = {t: SoakTenant(running, t, soak_fleet[t].canary, modes[t]) for t in FLEET}
    canaries = {t.id: t.canary for t in tenants.values()}
    gate = asyncio.Semaphore(MAX_IN_FLIGHT)
    started = time.monotonic()
    deadline = started + soak_seconds
    marks: dict[str, float] = {}

    async def client(t: SoakTenant, index: int) -> None:
        for round_ in range(MAX_SCENARIOS_PER_CLIENT):
            name, scenario = SCENARIOS[(index + round_) % len(SCENARIOS)]
            # The killed tenant's clients skip the queue, so that they are busy all through the
            # outage and the recovery (three more scenarios in flight at most).
            async with contextlib.nullcontext() if t.id == KILLED else gate:
                if round_ and time.monotonic() >= deadline:  # (every client's first scenario runs,
                    return  # so a loaded machine makes the soak slower, never a tenant untested)
                t.fresh_token()
                began = time.monotonic()
                try:
                    async with asyncio.timeout(SCENARIO_TIMEOUT):
                        await scenario(t)
                except Exception as error:
                    t.outcomes.append(Outcome(name, began, time.monotonic(), describe(error)))
                else:
                    t.outcomes.append(Outcome(name, began, time.monotonic()))

    async def chaos() -> None:
        """Kill KILLED's upstream at 40% of the budget; start it again a few seconds later."""
        await asyncio.sleep(soak_seconds * 0.4)
        marks["killed"] = time.monotonic()
        await asyncio.to_thread(killable.kill)
        await asyncio.sleep(max(3.0, soak_seconds * 0.12))
        marks["restarting"] = time.monotonic()
        await asyncio.to_thread(killable.start)
        marks["restarted"] = time.monotonic()

    clients = [
        asyncio.create_task(client(t, i * CLIENTS_PER_TENANT + c))
        for i, t in enumerate(tenants.values())
        for c in range(CLIENTS_PER_TENANT)
    ]
    chaos_task = asyncio.create_task(chaos())
    try:
        async with asyncio.timeout(soak_seconds + SCENARIO_TIMEOUT + 90):
            await asyncio.gather(*clients, chaos_task)
    finally:
        for task in [*clients, chaos_task]:
            task.cancel()
        await asyncio.gather(*clients, chaos_task, return_exceptions=True)
    duration = time.monotonic() - started

    # --- gather the evidence ----------------------------------------------------------------------
    others = [t for t in tenants.values() if t.id != KILLED]
    killed = tenants[KILLED]
    response_leaks = {t.id: sorted(set(t.sightings.foreign)) for t in tenants.values() if t.sightings.foreign}

    entries = cache_entries(running)
    cache_leaks: list[str] = []
    cache_bytes = 0
    for key, result in entries:
        cache_bytes += len(result)
        text = result.decode("utf-8", "replace")
        strangers = {found for found in CANARY.findall(text) if found != canaries.get(key[0])}
        if key[0] not in canaries or strangers:
            cache_leaks.append(f"{key[0]}/{key[4]}/{key[5]}: {sorted(strangers)}")

    running.app[SERVICES].flush()
    audit_files = sorted(p.name for p in audit_dir.iterdir())
    audit_canaries: list[str] = []
    audit_misfiled: list[str] = []
    audit_records = 0
    audit_bytes = 0
    for name in audit_files:
        text = (audit_dir / name).read_text()
        audit_bytes += len(text)
        audit_canaries += [f"{name}: {found}" for found in CANARY.findall(text)]
        owner = name.removesuffix(".jsonl")
        for line in text.splitlines():
            audit_records += 1
            if json.loads(line).get("tenant") != owner:
                audit_misfiled.append(f"{name}: {line[:120]}")

    # Nothing misrouted on the way in: each (recorded) upstream was only ever sent its own tenant.
    misrouted = {}
    for t in others:
        received = "\n".join(r.text for r in soak_fleet[t.id].recorder.snapshot())
        named = {a or b or c for a, b, c in NAMED_TENANT.findall(received)}
        if named != {t.id}:
            misrouted[t.id] = sorted(named)

    # Every call the clients cancelled was cancelled upstream, not left to run to its end.
    tags = [tag for t in others for tag in t.cancelled_tags]
    settle_by = time.monotonic() + 10
    while time.monotonic() < settle_by and not all("cancelled" in TOOL_EVENTS.get(tag, []) for tag in tags):
        await asyncio.sleep(0.05)
    not_cancelled = [
        (tag, TOOL_EVENTS.get(tag)) for tag in tags if "cancelled" not in TOOL_EVENTS.get(tag, [])
    ]
    finished = [tag for tag in tags if "finished" in TOOL_EVENTS.get(tag, [])]

    requests = metric_samples(running, "mcp_proxy_requests_total")
    by_outcome: Counter[str] = Counter()
    by_tenant: Counter[str] = Counter()
    for labels, value in requests:
        by_outcome[labels["outcome"]] += int(value)
        by_tenant[labels["tenant"]] += int(value)
    cache_states: Counter[str] = Counter()
    for labels, value in metric_samples(running, "mcp_proxy_cache_requests_total"):
        cache_states[labels["state"]] += int(value)

    def relative(mark: str) -> float | None:
        return round(marks[mark] - started, 2) if mark in marks else None

    restarted = marks.get("restarted", float("inf"))
    killed_errors = killed.errors()
    late_errors = [o for o in killed_errors if o.started >= restarted + RECOVERY_GRACE]
    served_after_restart = [o for o in killed.outcomes if o.error is None and o.started >= restarted]
    other_errors = [f"{t.id} {o.scenario}: {o.error}" for t in others for o in t.errors()]
    scenarios: Counter[str] = Counter(o.scenario for t in tenants.values() for o in t.outcomes if not o.error)
    foreign = len(response_leaks) + len(cache_leaks) + len(audit_canaries)
    report = {
        "tenants": len(tenants),
        "clients": len(clients),
        "clients_per_tenant": CLIENTS_PER_TENANT,
        "max_in_flight": MAX_IN_FLIGHT,
        "soak_seconds": soak_seconds,
        "duration_seconds": round(duration, 2),
        "proxy_start_seconds": round(started - setup_started, 2),
        "requests_served": sum(by_outcome.values()),
        "requests_by_outcome": dict(by_outcome),
        "requests_per_tenant_min": min(by_tenant[t] for t in FLEET),
        "scenarios_ok": sum(scenarios.values()),
        "scenarios_ok_by_kind": dict(scenarios),
        "errors": {"killed_tenant": len(killed_errors), "other_tenants": len(other_errors)},
        "other_tenants_first_errors": other_errors[:5],
        "killed_tenant": {
            "tenant": KILLED,
            "killed_at": relative("killed"),
            "restarted_at": relative("restarted"),
            "scenarios_ok_after_restart": len(served_after_restart),
            "errors_after_restart_grace": len(late_errors),
            "first_errors": sorted({o.error or "" for o in killed_errors})[:5],
        },
        "cache": {"entries": len(entries), "bytes": cache_bytes, **dict(cache_states)},
        "cancelled_upstream": len(tags) - len(not_cancelled),
        "audit": {"files": len(audit_files), "records": audit_records, "bytes": audit_bytes},
        "bytes_scanned": {
            "responses": sum(t.sightings.bytes for t in tenants.values()),
            "cache": cache_bytes,
            "audit": audit_bytes,
        },
        "foreign_canaries": {
            "responses": sum(len(t.sightings.foreign) for t in tenants.values()),
            "cache": len(cache_leaks),
            "audit": len(audit_canaries),
        },
        "foreign_bytes": foreign,
    }
    (tmp_path / "soak-report.json").write_text(json.dumps(report, indent=2))
    with capsys.disabled():
        print(f"\nsoak report ({tmp_path / 'soak-report.json'}):\n{json.dumps(report, indent=2)}")

    # --- zero foreign bytes anywhere ----------------------------------------------------------------
    assert not response_leaks, f"clients were sent other tenants' canaries: {response_leaks}"
    assert not cache_leaks, cache_leaks[:5]
    assert not audit_canaries, audit_canaries[:5]  # the audit holds summaries, never content
    assert not audit_misfiled, audit_misfiled[:5]
    assert audit_files == sorted(f"{t}.jsonl" for t in FLEET)
    assert not misrouted, misrouted
    # ... and the checks had something to check.
    assert all(t.sightings.own > 0 for t in tenants.values())
    assert len({key[0] for key, _ in entries}) == len(FLEET)
    assert cache_states["hit"] > 0
    assert tags and not not_cancelled, not_cancelled[:5]
    assert not finished, finished[:5]

    # --- one tenant's upstream killed under load: the others unaffected, it recovers --------------
    assert "restarted" in marks, "the killed upstream was never restarted within the budget"
    assert not other_errors, (
        f"{len(other_errors)} errors for tenants whose upstream was fine: {other_errors[:5]}"
    )
    assert killed_errors, "killing the upstream made no request fail: was it killed?"
    assert all(o.ended >= marks["killed"] for o in killed_errors), "errors before the kill"
    assert not late_errors, [o.error for o in late_errors[:5]]
    assert served_after_restart, "the killed tenant was never served again after its upstream came back"
    assert all(any(o.error is None for o in t.outcomes) for t in others), (
        "a tenant was starved: no scenario of it completed"
    )


# --- found with the soak: a half-open circuit can stay open for good ------------------------------


async def test_a_half_open_circuit_whose_trial_never_reaches_the_upstream_still_closes(
    make_proxy: StartProxy, upstreams: dict[str, Any]
) -> None:
    healthy = {"up": False}
    received: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        message = json.loads(body)
        if not is_era_probe(body):  # the proxy's own server/discover, not a client's call
            received.append(message.get("method", ""))
        if not healthy["up"]:
            return web.Response(status=503, text="down")
        result = {"content": [{"type": "text", "text": "back"}], "isError": False}
        return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": result})

    app = web.Application()
    app.router.add_post("/mcp", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        running = await make_proxy(
            {"acme": f"http://127.0.0.1:{port}/mcp", "globex": upstreams["globex"]},
            limits={"circuit_failures": 2, "circuit_open_seconds": 0.5},
        )

        async def whoami() -> tuple[int, dict[str, Any]]:
            status, _, body = await running.post(
                call_body("whoami", {}),
                token=running.token("acme"),
                headers=modern_headers("tools/call", "whoami"),
            )
            return status, json.loads(body)

        assert [(await whoami())[0] for _ in range(2)] == [502, 502]
        status, answer = await whoami()
        assert (status, answer["error"]["code"]) == (503, -32012)  # open: failing fast
        assert len(received) == 2
        healthy["up"] = True
        await asyncio.sleep(0.6)  # half-open: the next request is the trial
        # ... and the trial is a request the proxy answers itself, without the upstream.
        status, _, body = await running.post(
            None, raw=b"{", token=running.token("acme"), headers=modern_headers("tools/call", "whoami")
        )
        assert (status, error_of(body)["code"]) == (400, -32700)
        assert len(received) == 2
        # The upstream is healthy: within a few open periods a request must reach it again.
        statuses: list[int] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                while not statuses or statuses[-1] != 200:
                    statuses.append((await whoami())[0])
                    await asyncio.sleep(0.2)
        assert statuses[-1] == 200, f"still refused after 2 s: {statuses}"
        assert received[-1] == "tools/call"
    finally:
        await runner.cleanup()


# --- found with the soak: a long-running trial kept the circuit half-open for its whole stream -----


async def test_a_half_open_trial_is_decided_when_the_upstream_answers_not_when_its_stream_ends(
    make_proxy: StartProxy, upstreams: dict[str, Any]
) -> None:
    """The soak's killed tenant was refused (503) for seconds after its upstream came back: the
    half-open trial happened to be a long streamed call, and nothing else could go upstream until
    that stream ended."""
    healthy = {"up": False}
    stream_open = asyncio.Event()
    release = asyncio.Event()

    async def handle(request: web.Request) -> web.StreamResponse:
        message = json.loads(await request.read())
        if not healthy["up"]:
            return web.Response(status=503, text="down")
        result = {"content": [{"type": "text", "text": message["params"]["name"]}], "isError": False}
        answer = {"jsonrpc": "2.0", "id": message["id"], "result": result}
        if message["params"]["name"] != "slow":
            return web.json_response(answer)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b": working\n\n")
        stream_open.set()
        await release.wait()  # a long tool call: its answer comes when the test says so
        await response.write(b"event: message\ndata: " + json.dumps(answer).encode() + b"\n\n")
        return response

    app = web.Application()
    app.router.add_post("/mcp", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        running = await make_proxy(
            {"acme": f"http://127.0.0.1:{port}/mcp", "globex": upstreams["globex"]},
            limits={"circuit_failures": 2, "circuit_open_seconds": 0.3},
        )

        async def call(name: str) -> tuple[int, bytes]:
            status, _, body = await running.post(
                call_body(name, {}), token=running.token("acme"), headers=modern_headers("tools/call", name)
            )
            return status, body

        assert [(await call("quick"))[0] for _ in range(2)] == [502, 502]
        assert (await call("quick"))[0] == 503  # open
        healthy["up"] = True
        await asyncio.sleep(0.4)  # half-open: the next request is the trial, and it is a long one
        trial = asyncio.create_task(call("slow"))
        async with asyncio.timeout(5):
            await stream_open.wait()
        status, body = await call("quick")  # while the trial's stream is still open
        assert status == 200, body
        assert not trial.done()
        release.set()
        status, body = await trial
        assert status == 200 and b'"slow"' in body
    finally:
        release.set()
        await runner.cleanup()
