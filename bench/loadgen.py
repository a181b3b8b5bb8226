"""The Python side of load generation: an aiohttp client, run in its own process.

    python -m bench.loadgen load SPEC.json   closed-loop load (the fallback when wrk is missing)
    python -m bench.loadgen sse SPEC.json    SSE relay: time to first event and events per second

Each prints one JSON object on stdout, including its own CPU time, so the harness can tell
whether the generator (rather than the system under test) was the bottleneck. `open_sessions`
is imported by the harness to open handshake-era sessions (initialize, then
notifications/initialized) before a measured run.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import resource
import sys
import time
from typing import Any

import aiohttp

HANDSHAKE_VERSION = "2025-11-25"
MODERN_VERSION = "2026-07-28"
BASE_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def _connector(limit: int) -> aiohttp.TCPConnector:
    return aiohttp.TCPConnector(limit=limit, limit_per_host=limit, ttl_dns_cache=None, use_dns_cache=True)


# --- handshake-era sessions ---------------------------------------------------------------------


def initialize_body(request_id: int = 1) -> bytes:
    body = {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "initialize",
        "params": {
            "protocolVersion": HANDSHAKE_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "mcp-bench", "version": "1"},
        },
    }
    return json.dumps(body, separators=(",", ":")).encode()


INITIALIZED = b'{"jsonrpc":"2.0","method":"notifications/initialized"}'


async def open_sessions(
    url: str,
    headers: dict[str, str],
    count: int,
    concurrency: int = 32,
    send_initialized: bool = True,
    keep_ids: bool = True,
) -> dict[str, Any]:
    """Open `count` handshake-era sessions; returns their ids (when kept), failures and timing."""
    ids: list[str] = []
    failures: list[str] = []
    numbers = iter(range(count))
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=_connector(concurrency)) as http:

        async def worker() -> None:
            for number in numbers:
                sent = {**BASE_HEADERS, **headers}
                async with http.post(url, data=initialize_body(number + 1), headers=sent) as response:
                    await response.read()
                    session_id = response.headers.get("Mcp-Session-Id")
                    if response.status != 200 or session_id is None:
                        failures.append(f"initialize: HTTP {response.status}")
                        continue
                if send_initialized:
                    follow = {
                        **sent,
                        "Mcp-Session-Id": session_id,
                        "MCP-Protocol-Version": HANDSHAKE_VERSION,
                    }
                    async with http.post(url, data=INITIALIZED, headers=follow) as response:
                        await response.read()
                        if response.status not in (200, 202):
                            failures.append(f"notifications/initialized: HTTP {response.status}")
                if keep_ids:
                    ids.append(session_id)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {
        "ids": ids,
        "opened": count - len(failures),
        "failures": failures[:5],
        "failure_count": len(failures),
        "seconds": time.perf_counter() - started,
    }


# --- closed-loop load ---------------------------------------------------------------------------


async def run_load(spec: dict[str, Any]) -> dict[str, Any]:
    """`concurrency` workers, each sending one request at a time, for `duration` seconds."""
    url: str = spec["url"]
    headers: dict[str, str] = spec["headers"]
    prefix: bytes = spec["body_prefix"].encode()
    suffix: bytes = spec["body_suffix"].encode()
    sessions: list[str] = spec.get("sessions") or []
    expect: bytes = spec.get("expect", '"result"').encode()
    concurrency: int = spec["concurrency"]
    counter = itertools.count(1)
    latencies: list[int] = []
    bad = 0
    errors = 0
    measuring = False
    stop = False

    async with aiohttp.ClientSession(connector=_connector(concurrency)) as http:

        async def worker() -> None:
            nonlocal bad, errors
            while not stop:
                number = next(counter)
                sent = headers
                if sessions:
                    sent = {**headers, "Mcp-Session-Id": sessions[number % len(sessions)]}
                body = prefix + str(number).encode() + suffix
                began = time.perf_counter_ns()
                try:
                    async with http.post(url, data=body, headers=sent) as response:
                        data = await response.read()
                        status = response.status
                except (aiohttp.ClientError, OSError):
                    errors += 1
                    continue
                took = time.perf_counter_ns() - began
                if measuring:
                    latencies.append(took)
                    if status != 200 or expect not in data:
                        bad += 1

        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        await asyncio.sleep(spec.get("warmup", 1.0))
        measuring = True
        cpu_before = cpu_seconds()
        began = time.perf_counter()
        await asyncio.sleep(spec["duration"])
        measuring = False
        elapsed = time.perf_counter() - began
        cpu = cpu_seconds() - cpu_before
        stop = True
        await asyncio.gather(*tasks)
    ordered = sorted(latencies)
    return {
        "generator": "aiohttp",
        "requests": len(ordered),
        "seconds": elapsed,
        "rps": len(ordered) / elapsed,
        "bad": bad,
        "errors": errors,
        "p50_ms": percentile(ordered, 0.50) / 1e6,
        "p90_ms": percentile(ordered, 0.90) / 1e6,
        "p99_ms": percentile(ordered, 0.99) / 1e6,
        "max_ms": (ordered[-1] / 1e6) if ordered else float("nan"),
        "generator_cpu_seconds": cpu,
    }


# --- SSE relay ----------------------------------------------------------------------------------


async def _one_stream(http: aiohttp.ClientSession, url: str, headers: dict[str, str], body: bytes) -> Any:
    """(seconds to the first complete event, seconds to the end, events seen, answered)."""
    began = time.perf_counter()
    first: float | None = None
    events = 0
    tail = b""
    answered = False
    async with http.post(url, data=body, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(
                f"SSE request answered HTTP {response.status}: {(await response.read())[:200]!r}"
            )
        async for chunk in response.content.iter_any():
            window = tail + chunk
            found = window.count(b"\n\n")
            if found and first is None:
                first = time.perf_counter() - began
            events += found
            tail = window[-1:]
            if b'"result"' in chunk:
                answered = True
    ended = time.perf_counter() - began
    return (first if first is not None else ended), ended, events, answered


async def run_sse(spec: dict[str, Any]) -> dict[str, Any]:
    url: str = spec["url"]
    headers: dict[str, str] = spec["headers"]

    def body(n: int, number: int) -> bytes:
        return (spec["body_template"].replace("__N__", str(n)).replace("__ID__", str(number))).encode()

    numbers = itertools.count(1)
    async with aiohttp.ClientSession(connector=_connector(1)) as http:
        for _ in range(3):  # warm-up: connections, the proxy's catalog
            await _one_stream(http, url, headers, body(spec["small_events"], next(numbers)))
        firsts: list[float] = []
        cpu_before = cpu_seconds()
        for _ in range(spec["ttfe_repeats"]):
            first, _ended, _events, answered = await _one_stream(
                http, url, headers, body(spec["small_events"], next(numbers))
            )
            if not answered:
                raise RuntimeError("an SSE stream ended without its answer")
            firsts.append(first)
        rates: list[float] = []
        event_counts: list[int] = []
        stream_cpu_before = cpu_seconds()
        stream_seconds = 0.0
        for _ in range(spec["stream_repeats"]):
            first, ended, events, answered = await _one_stream(
                http, url, headers, body(spec["stream_events"], next(numbers))
            )
            if not answered:
                raise RuntimeError("an SSE stream ended without its answer")
            rates.append((events - 1) / max(ended - first, 1e-9))
            event_counts.append(events)
            stream_seconds += ended
        stream_cpu = cpu_seconds() - stream_cpu_before
    firsts.sort()
    rates.sort()
    return {
        "generator": "aiohttp",
        "ttfe_p50_ms": percentile(firsts, 0.5) * 1000,
        "ttfe_p90_ms": percentile(firsts, 0.9) * 1000,
        "events_per_second": percentile(rates, 0.5),
        "events_per_stream": event_counts,
        "generator_cpu_seconds": cpu_seconds() - cpu_before,
        "stream_seconds": stream_seconds,
        "generator_stream_cpu_share": stream_cpu / max(stream_seconds, 1e-9),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("mode", choices=["load", "sse"])
    parser.add_argument("spec", help="JSON file with the run's parameters")
    args = parser.parse_args(argv)
    with open(args.spec, encoding="utf-8") as handle:
        spec = json.load(handle)
    import uvloop

    runner = run_load if args.mode == "load" else run_sse
    result = uvloop.run(runner(spec))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
