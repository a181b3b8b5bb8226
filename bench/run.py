"""Benchmark mcp-tenant-proxy against direct connections to the same upstreams, in one run.

    python -m bench.run                  # every scenario (~9 minutes on a quiet 2-core machine)
    python -m bench.run --quick          # a short smoke run (~70 s)
    python -m bench.run --only s1_modern --profile   # one scenario, with a py-spy profile of the proxy

Every scenario starts its own processes: the upstream(s), the proxy (`python -m proxy run`) and the
load generator (wrk with a generated Lua script, or the aiohttp client of bench/loadgen.py) are
separate processes pinned to cores before each measurement (see bench/README.md for the layout).
Every proxy figure has a direct baseline measured in the same run, and is reported as a ratio or
as the latency the proxy adds. Prints a table and writes JSON (--json, default
bench/results/latest.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loadgen import HANDSHAKE_VERSION, MODERN_VERSION, open_sessions
from bench.nginx import nginx_binary, nginx_config

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
SECRET_ENV = "MCP_BENCH_SECRET"
ISSUER = "bench"
GEN_CORE, SUT_CORE = 0, 1
NOISE_LIMIT = 20.0  # % of one core used by other processes during a measurement before it is repeated
CLK_TCK = os.sysconf("SC_CLK_TCK")

FULL_POLICY = """\
tenant_arguments: {names: [tenant_id], on_mismatch: rewrite, hide_from_schema: true}
tools:
  allow: [lookup, whoami, progress, stream_events]
  deny: []
"""
CACHED_POLICY = FULL_POLICY + "  cache_ttl_seconds: {lookup: 300}\n"


# --- settings -----------------------------------------------------------------------------------


@dataclass
class Settings:
    quick: bool
    pin: bool
    generator: str  # "wrk" or "aiohttp"
    proxy_log_level: str
    profile: bool
    results_dir: Path
    warmup: int = 2
    duration: int = 5
    sessions: int = 10_000
    tenants: int = 1_000
    tenant_duration: int = 2
    tenant_rounds: int = 2
    ttfe_repeats: int = 50
    stream_events: int = 50_000
    stream_repeats: int = 3
    profile_seconds: int = 10
    counted_requests: int = 200  # s8: requests counted under callgrind
    template_tenants: int = 100_000  # s10: tenant ids one template serves (an allowlist file lists them)
    active_tenants: int = 1_000  # s9: distinct tenants made active, then left idle
    retries: int = 2
    quiet_patience: float = 30.0
    retry_budget: float = 120.0  # seconds a whole run may spend repeating noisy measurements

    @classmethod
    def make(cls, args: argparse.Namespace, generator: str) -> Settings:
        settings = cls(
            quick=args.quick,
            pin=not args.no_pin and (os.cpu_count() or 1) >= 2,
            generator=generator,
            proxy_log_level=args.proxy_log_level,
            profile=args.profile,
            quiet_patience=args.wait_quiet,
            results_dir=Path(args.json).resolve().parent,
        )
        if args.quick:
            settings.warmup, settings.duration, settings.tenant_duration = 1, 1, 1
            settings.sessions, settings.tenant_rounds = 2_000, 1
            settings.ttfe_repeats, settings.stream_events, settings.stream_repeats = 20, 10_000, 2
            settings.profile_seconds = 5
            settings.counted_requests = 50
            settings.active_tenants = 200
            settings.retry_budget = 15.0
        return settings


# --- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pin(pid: int, core: int | None) -> None:
    """Move every thread of a process to one core (threads it starts later inherit it)."""
    if core is None:
        return
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError, OSError):
                os.sched_setaffinity(int(tid), {core})


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads included."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU time all cores spent busy since boot (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat", encoding="ascii") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def background_cpu_pct(seconds: float = 1.0) -> float:
    """How busy the machine is without the benchmark (percent of one core)."""
    before = machine_busy_seconds()
    time.sleep(seconds)
    return 100 * (machine_busy_seconds() - before) / seconds


def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Proc:
    """A child process the harness started, with its log in the run's temporary directory."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log = log
        self._log_handle = log.open("wb")
        self.popen = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=self._log_handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.pid = self.popen.pid

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def rss_mb(self) -> float:
        return proc_rss_mb(self.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        self._log_handle.close()


@dataclass
class Upstream:
    proc: Proc
    url: str


@dataclass
class Proxy:
    proc: Proc
    url: str
    config_path: Path
    audit_dir: Path
    startup_seconds: float
    tokens: dict[str, str] = field(default_factory=dict)

    config: Any = None  # the loaded config, once a token was minted

    def token(self, tenant: str) -> str:
        if tenant not in self.tokens:
            from proxy.config import load_config
            from proxy.layers.auth.authenticator import mint_token

            if self.config is None:
                self.config = load_config(self.config_path)
            self.tokens[tenant] = mint_token(
                self.config, ISSUER, tenant, f"bench-user@{tenant}", ttl_seconds=7200
            )
        return self.tokens[tenant]

    def gauge(self, name: str) -> float:
        """A metric without labels, as /metrics shows it now."""
        status, _, body = http_request(self.url.replace("/mcp", "/metrics"), method="GET")
        found = re.search(rf"^{name} (\S+)$", body.decode(), re.MULTILINE)
        if status != 200 or found is None:
            raise RuntimeError(f"/metrics has no {name} (HTTP {status})")
        return float(found.group(1))

    def audit_counts(self, tenant: str) -> Counter[str]:
        """How many audit records of the tenant's file have each cache state."""
        counts: Counter[str] = Counter()
        path = self.audit_dir / f"{tenant}.jsonl"
        with contextlib.suppress(OSError), path.open(encoding="utf-8") as handle:
            for line in handle:
                with contextlib.suppress(ValueError):
                    counts[json.loads(line).get("cache", "?")] += 1
        return counts


def wait_for_port(port: int, proc: Proc, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited during start-up:\n{proc.tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.02)
    raise RuntimeError(f"{proc.name} did not listen on {port} within {timeout}s:\n{proc.tail()}")


def http_request(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None, method: str = "POST"
) -> tuple[int, dict[str, str], bytes]:
    """One blocking HTTP request (set-up and checks only, never measured)."""
    parts = re.match(r"http://([^:/]+):(\d+)(/.*)?$", url)
    assert parts is not None, url
    connection = http.client.HTTPConnection(parts.group(1), int(parts.group(2)), timeout=30)
    try:
        connection.request(method, parts.group(3) or "/", body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


class Harness:
    """Starts and stops one scenario's processes; measures loads against them."""

    def __init__(self, settings: Settings, tmp: Path) -> None:
        self.settings = settings
        self.tmp = tmp
        self.procs: list[Proc] = []
        self.env = {**os.environ, SECRET_ENV: os.environ[SECRET_ENV], "PYTHONUNBUFFERED": "1"}
        self.counter = 0

    def _path(self, stem: str, suffix: str = "") -> Path:
        self.counter += 1
        return self.tmp / f"{self.counter:03d}-{stem}{suffix}"

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    def pin(self, placement: dict[Proc, int]) -> dict[str, int | None]:
        """Place processes on cores; returns the layout as recorded in the results."""
        for proc, core in placement.items():
            pin(proc.pid, core if self.settings.pin else None)
        return {proc.name: (core if self.settings.pin else None) for proc, core in placement.items()}

    # --- starting things ----------------------------------------------------------------------

    def start_upstream(
        self, kind: str, cache_hints: bool = False, target: str | None = None, wrap: list[str] | None = None
    ) -> Upstream:
        """`wrap`: a command the upstream runs under (s8: valgrind), which also gives it longer to start."""
        port = free_port()
        argv = [*(wrap or []), PYTHON, "-m", "bench.upstreams", kind, str(port)]
        if target is not None:
            argv.append(target)
        if cache_hints:
            argv.append("--cache-hints")
        proc = Proc(f"{kind}-upstream", argv, self._path(f"{kind}-upstream", ".log"), self.env)
        self.procs.append(proc)
        pin(proc.pid, GEN_CORE if self.settings.pin else None)
        wait_for_port(port, proc, timeout=300 if wrap else 30)
        return Upstream(proc, f"http://127.0.0.1:{port}/mcp")

    def start_nginx(self, upstream: Upstream, wrap: list[str] | None = None) -> Upstream | None:
        """nginx relaying to `upstream` (one process, kept-alive upstream connections), or None when
        nginx is not installed."""
        binary = nginx_binary()
        if binary is None:
            return None
        work = self._path("nginx")
        port = free_port()
        upstream_port = int(upstream.url.split(":")[2].split("/")[0])
        work.mkdir(parents=True)
        (work / "nginx.conf").write_text(nginx_config(work, port, upstream_port))
        argv = [
            *(wrap or []),
            binary,
            "-p",
            str(work),
            "-e",
            str(work / "error.log"),
            "-c",
            str(work / "nginx.conf"),
        ]
        proc = Proc("nginx", argv, work / "nginx.log", self.env)
        self.procs.append(proc)
        wait_for_port(port, proc, timeout=300 if wrap else 30)
        return Upstream(proc, f"http://127.0.0.1:{port}/mcp")

    def start_proxy(
        self,
        tenants: dict[str, str],
        policy: str = FULL_POLICY,
        cache: bool = False,
        max_sessions: int = 1000,
        core: int = SUT_CORE,
        extra: dict[str, Any] | None = None,
        wrap: list[str] | None = None,
        tenant_limits: dict[str, dict[str, Any]] | None = None,
    ) -> Proxy:
        work = self._path("proxy")
        (work / "policies").mkdir(parents=True)
        (work / "policies" / "bench.yaml").write_text(policy)
        port = free_port()
        url = f"http://127.0.0.1:{port}/mcp"
        config = {
            "listen": {
                "host": "127.0.0.1",
                "port": port,
                "path": "/mcp",
                "public_url": url,
                "drain_delay_seconds": 0,  # no load balancer to wait for: stop at once
                "shutdown_grace_seconds": 1,
            },
            "auth": {
                "authorization_servers": ["http://127.0.0.1/bench-idp"],
                "issuers": [
                    {
                        "issuer": ISSUER,
                        "audiences": [url],
                        "algorithms": ["HS256"],
                        "secret_env": SECRET_ENV,
                        "tenant_claim": "tenant",
                    }
                ],
            },
            "tenants": {
                tenant: {
                    "upstream": {"url": up},
                    "policy": "bench",
                    **({"limits": tenant_limits[tenant]} if tenant in (tenant_limits or {}) else {}),
                }
                for tenant, up in tenants.items()
            },
            "policies_dir": str(work / "policies"),
            "cache": {"enabled": cache},
            "sessions": {"idle_timeout_seconds": 3600, "max_per_tenant": max_sessions},
            "audit": {"dir": str(work / "audit")},
            "metrics": {"listen": {"host": "127.0.0.1", "port": 0}},
            **(extra or {}),
        }
        config_path = work / "config.yaml"
        import yaml

        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        argv = [
            *(["taskset", "-c", str(core)] if self.settings.pin else []),
            *(wrap or []),
            PYTHON,
            "-m",
            "proxy",
            "run",
            "--config",
            str(config_path),
            "--log-level",
            self.settings.proxy_log_level,
        ]
        began = time.perf_counter()
        proc = Proc("proxy", argv, work / "proxy.log", self.env)
        self.procs.append(proc)
        deadline = time.monotonic() + (300 if wrap else 60)
        health = f"http://127.0.0.1:{port}/healthz"
        while True:
            if not proc.alive():
                raise RuntimeError(f"the proxy exited during start-up:\n{proc.tail()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if http_request(health, method="GET")[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the proxy did not answer /healthz in time:\n{proc.tail()}")
            time.sleep(0.005)
        startup = time.perf_counter() - began
        return Proxy(proc, url, config_path, work / "audit", startup)

    def start_redis(self) -> str:
        """A redis-server on a free loopback port (no persistence), for state.backend: redis."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (tests/install-redis-server installs it)")
        port = free_port()
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        proc = Proc("redis", argv, self._path("redis", ".log"), self.env)
        self.procs.append(proc)
        pin(proc.pid, GEN_CORE if self.settings.pin else None)
        wait_for_port(port, proc)
        return f"redis://127.0.0.1:{port}/0"

    # --- measuring ----------------------------------------------------------------------------

    def measure(
        self,
        label: str,
        run: Callable[[], dict[str, Any]],
        watch: dict[str, Proc],
        warmup: Callable[[], object] | None = None,
    ) -> dict[str, Any]:
        """Run one measurement and account for the CPU of every process on the machine.

        `run` returns a result with `generator_process_cpu_seconds`. When other processes (not
        the generator, not a watched one) used more than NOISE_LIMIT % of a core meanwhile, the
        measurement is repeated after waiting for quiet, up to `retries` times.
        """
        attempts: list[dict[str, Any]] = []
        while True:
            if warmup is not None:
                warmup()
            cpu_before = {name: proc.cpu_seconds() for name, proc in watch.items()}
            busy_before = machine_busy_seconds()
            began = time.perf_counter()
            result = run()
            wall = time.perf_counter() - began
            busy = machine_busy_seconds() - busy_before
            ours = result["generator_process_cpu_seconds"]
            for name, proc in watch.items():
                used = proc.cpu_seconds() - cpu_before[name]
                ours += used
                result[f"{name}_cpu_seconds"] = used
            # Whatever else ran on the machine meanwhile (other processes, the kernel's own work).
            result["other_cpu_pct"] = max(0.0, 100 * (busy - ours) / wall)
            attempts.append(result)
            if (
                result["other_cpu_pct"] <= NOISE_LIMIT
                or len(attempts) > self.settings.retries
                or self.settings.retry_budget <= 0
            ):
                # The least disturbed attempt counts.
                best = min(attempts, key=lambda attempt: attempt["other_cpu_pct"])
                best["attempts"] = len(attempts)
                return best
            began_waiting = time.perf_counter()
            print(
                f"   other processes used {result['other_cpu_pct']:.0f}% of a core during {label}: "
                "measuring again",
                flush=True,
            )
            wait_for_quiet(min(self.settings.quiet_patience, self.settings.retry_budget))
            self.settings.retry_budget -= time.perf_counter() - began_waiting + wall

    def load(
        self, target: Target, concurrency: int, watch: dict[str, Proc], duration: int | None = None
    ) -> dict[str, Any]:
        """One closed-loop measurement (after a warm-up), with the CPU each watched process used."""
        length = duration or self.settings.duration
        generate = self._wrk if self.settings.generator == "wrk" else self._aiohttp

        def warmup() -> object:
            return generate(target, concurrency, self.settings.warmup) if self.settings.warmup else None

        def run() -> dict[str, Any]:
            return generate(target, concurrency, length)

        result = self.measure(f"{target.name} c={concurrency}", run, watch, warmup)
        seconds = result["seconds"]
        for name in watch:
            used = result.pop(f"{name}_cpu_seconds")
            result[f"{name}_cpu_pct"] = 100 * used / seconds
            result[f"{name}_cpu_us_per_request"] = 1e6 * used / max(result["requests"], 1)
        result["generator_cpu_pct"] = 100 * result.pop("generator_cpu_seconds") / seconds
        result["concurrency"] = concurrency
        result["target"] = target.name
        result["valid"] = result["requests"] > 0 and (result["bad"] + result["errors"]) <= max(
            1, result["requests"] // 1000
        )
        return result

    def _wrk(self, target: Target, concurrency: int, duration: int) -> dict[str, Any]:
        script = self._path(f"wrk-{target.name}", ".lua")
        script.write_text(target.lua())
        argv = [
            *(["taskset", "-c", str(GEN_CORE)] if self.settings.pin else []),
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{duration}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            target.url,
        ]
        with self._path("wrk", ".err").open("wb") as errors:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors)
            assert proc.stdout is not None
            output = proc.stdout.read().decode(errors="replace")
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        match = re.search(r"^BENCHJSON (\{.*\})$", output, re.MULTILINE)
        if proc.returncode != 0 or match is None:
            raise RuntimeError(f"wrk failed ({proc.returncode}):\n{output[-2000:]}")
        raw = json.loads(match.group(1))
        seconds = raw["duration_us"] / 1e6
        errors_total = sum(
            raw[k] for k in ("errors_connect", "errors_read", "errors_write", "errors_timeout")
        )
        return {
            "generator": "wrk",
            "requests": raw["requests"],
            "seconds": seconds,
            "rps": raw["requests"] / seconds,
            "bad": raw["bad"],
            "errors": errors_total,
            "p50_ms": raw["p50_us"] / 1000,
            "p90_ms": raw["p90_us"] / 1000,
            "p99_ms": raw["p99_us"] / 1000,
            "max_ms": raw["max_us"] / 1000,
            "generator_cpu_seconds": usage.ru_utime + usage.ru_stime,
            "generator_process_cpu_seconds": usage.ru_utime + usage.ru_stime,
        }

    def _aiohttp(self, target: Target, concurrency: int, duration: int) -> dict[str, Any]:
        spec = {
            "url": target.url,
            "headers": target.headers,
            "body_prefix": target.body_prefix,
            "body_suffix": target.body_suffix,
            "sessions": target.sessions,
            "expect": target.expect,
            "concurrency": concurrency,
            "duration": duration,
            "warmup": 0.5,
        }
        return self._python_generator("load", spec)

    def _python_generator(self, mode: str, spec: dict[str, Any]) -> dict[str, Any]:
        spec_path = self._path(f"loadgen-{mode}", ".json")
        spec_path.write_text(json.dumps(spec))
        argv = [
            *(["taskset", "-c", str(GEN_CORE)] if self.settings.pin else []),
            PYTHON,
            "-m",
            "bench.loadgen",
            mode,
            str(spec_path),
        ]
        with self._path(f"loadgen-{mode}", ".err").open("w+b") as errors:
            proc = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=errors)
            assert proc.stdout is not None
            output = proc.stdout.read().decode(errors="replace")
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                errors.seek(0)
                raise RuntimeError(
                    f"the load generator failed:\n{errors.read().decode(errors='replace')[-3000:]}"
                )
        result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
        # The whole process (interpreter start-up included), for the machine's CPU accounting.
        result["generator_process_cpu_seconds"] = usage.ru_utime + usage.ru_stime
        return result

    def sse(
        self, url: str, headers: dict[str, str], body_template: str, watch: dict[str, Proc]
    ) -> dict[str, Any]:
        spec = {
            "url": url,
            "headers": headers,
            "body_template": body_template,
            "small_events": 3,
            "ttfe_repeats": self.settings.ttfe_repeats,
            "stream_events": self.settings.stream_events,
            "stream_repeats": self.settings.stream_repeats,
        }
        return self.measure(f"SSE {url}", lambda: self._python_generator("sse", spec), watch)

    def profile(self, proxy: Proxy, target: Target, concurrency: int, name: str) -> dict[str, Any]:
        """Sample the proxy with py-spy while a load runs; the folded stacks go to results_dir."""
        spy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
        if not Path(spy).exists():
            return {"error": "py-spy is not installed (pip install py-spy)"}
        out = self.settings.results_dir / f"profile-{name}.folded"
        seconds = self.settings.profile_seconds
        argv = [
            *(["taskset", "-c", str(GEN_CORE)] if self.settings.pin else []),
            spy,
            "record",
            "--pid",
            str(proxy.proc.pid),
            "--duration",
            str(seconds + 1),
            "--gil",
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(out),
        ]
        spy_proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)
        retries, self.settings.retries = self.settings.retries, 0  # py-spy samples one run only
        try:
            load = self.load(target, concurrency, {"proxy": proxy.proc}, duration=seconds)
        finally:
            self.settings.retries = retries
        _, err = spy_proc.communicate(timeout=60)
        if spy_proc.returncode != 0 or not out.exists():
            return {"error": f"py-spy failed: {err.decode(errors='replace')[-500:]}"}
        return {"load": load, "folded": str(out), **summarize_profile(out)}


# --- requests -----------------------------------------------------------------------------------


def _lua(text: str) -> str:
    assert "]==]" not in text
    return f"[==[{text}]==]"


@dataclass
class Target:
    """What one measured run sends: a POST whose JSON-RPC id is a counter, optionally sessions."""

    name: str
    url: str
    headers: dict[str, str]
    body_prefix: str
    body_suffix: str
    sessions: list[str] = field(default_factory=list)
    expect: str = '"result"'
    status: int = 200  # the answer's expected HTTP status (s9: 429 for refused requests)
    delay_ms: int = 0  # wrk: each connection waits this long after an answer (a paced load)
    http_method: str = "POST"  # (s9's floor: GET /healthz, no body)

    def body(self, request_id: int = 1) -> bytes:
        return f"{self.body_prefix}{request_id}{self.body_suffix}".encode()

    def probe(self) -> bytes:
        """One request outside any measurement; raises unless it is answered as expected."""
        headers = dict(self.headers)
        if self.sessions:
            headers["Mcp-Session-Id"] = self.sessions[0]
        status, _, body = http_request(self.url, self.body(), headers)
        if status != self.status or self.expect.encode() not in body:
            raise RuntimeError(f"{self.name}: unexpected answer HTTP {status}: {body[:300]!r}")
        return body

    def lua(self) -> str:
        path = "/" + self.url.split("/", 3)[3]
        headers = ", ".join(f"[ {_lua(k)} ] = {_lua(v)}" for k, v in self.headers.items())
        sessions = ", ".join(_lua(s) for s in self.sessions)
        return f"""
local path = {_lua(path)}
local headers = {{ {headers} }}
local prefix = {_lua(self.body_prefix)}
local suffix = {_lua(self.body_suffix)}
local sessions = {{ {sessions} }}
local nsessions = #sessions
local expect = {_lua(self.expect)}
local expected_status = {self.status}
local counter = 0
bad = 0
local threads = {{}}

function setup(thread)
  table.insert(threads, thread)
end

function request()
  counter = counter + 1
  if nsessions > 0 then
    headers["Mcp-Session-Id"] = sessions[(counter % nsessions) + 1]
  end
  return wrk.format("POST", path, headers, prefix .. counter .. suffix)
end

function response(status, hdrs, body)
  if status ~= expected_status or not string.find(body, expect, 1, true) then
    bad = bad + 1
  end
end

{"function delay() return " + str(self.delay_ms) + " end" if self.delay_ms else ""}

function done(summary, latency, requests)
  local b = 0
  for _, t in ipairs(threads) do
    b = b + t:get("bad")
  end
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {{"requests":%d,"duration_us":%d,"errors_connect":%d,"errors_read":%d,' ..
    '"errors_write":%d,"errors_status":%d,"errors_timeout":%d,"bad":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout, b,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def _meta() -> str:
    return (
        f'"_meta":{{"io.modelcontextprotocol/protocolVersion":"{MODERN_VERSION}",'
        '"io.modelcontextprotocol/clientCapabilities":{}}'
    )


BASE_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def modern_call(
    name: str, url: str, tool: str, arguments: dict[str, Any], token: str | None = None
) -> Target:
    headers = {
        **BASE_HEADERS,
        "MCP-Protocol-Version": MODERN_VERSION,
        "Mcp-Method": "tools/call",
        "Mcp-Name": tool,
        **_auth(token),
    }
    args = json.dumps(arguments, separators=(",", ":"))
    suffix = f',"method":"tools/call","params":{{"name":"{tool}","arguments":{args},{_meta()}}}}}'
    return Target(name, url, headers, '{"jsonrpc":"2.0","id":', suffix)


def modern_list(name: str, url: str, token: str | None = None) -> Target:
    headers = {
        **BASE_HEADERS,
        "MCP-Protocol-Version": MODERN_VERSION,
        "Mcp-Method": "tools/list",
        **_auth(token),
    }
    return Target(
        name, url, headers, '{"jsonrpc":"2.0","id":', f',"method":"tools/list","params":{{{_meta()}}}}}'
    )


def handshake_call(
    name: str, url: str, tool: str, arguments: dict[str, Any], sessions: list[str], token: str | None = None
) -> Target:
    headers = {**BASE_HEADERS, "MCP-Protocol-Version": HANDSHAKE_VERSION, **_auth(token)}
    args = json.dumps(arguments, separators=(",", ":"))
    suffix = f',"method":"tools/call","params":{{"name":"{tool}","arguments":{args}}}}}'
    return Target(name, url, headers, '{"jsonrpc":"2.0","id":', suffix, sessions=sessions)


def sessions_for(url: str, count: int, token: str | None = None) -> list[str]:
    opened = asyncio.run(open_sessions(url, _auth(token), count, concurrency=min(count, 16)))
    if opened["failure_count"]:
        raise RuntimeError(f"could not open sessions at {url}: {opened['failures']}")
    ids: list[str] = opened["ids"]
    return ids


# --- results ------------------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    metric: str
    direct: float | None
    proxy: float | None
    unit: str
    compare: str  # "added" (proxy - direct), "ratio" (proxy / direct) or "" (proxy alone)
    target: str = ""
    passed: bool | None = None  # None: informational
    valid: bool = True
    noisy: bool = False  # other processes used the CPUs during a measurement behind it

    @property
    def delta(self) -> float | None:
        if self.direct is None or self.proxy is None:
            return None
        if self.compare == "added":
            return self.proxy - self.direct
        if self.compare == "ratio":
            return self.proxy / self.direct if self.direct else None
        return None

    @property
    def status(self) -> str:
        if not self.valid:
            return "INVALID"
        mark = "*" if self.noisy else ""
        if self.passed is None:
            return "info" + mark
        return ("pass" if self.passed else "MISS") + mark

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "metric": self.metric,
            "direct": self.direct,
            "proxy": self.proxy,
            "unit": self.unit,
            "compare": self.compare,
            "delta": self.delta,
            "target": self.target,
            "status": self.status,
            "noisy": self.noisy,
        }


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3f}" if unit in ("ms", "s") else f"{value:.2f}"
    return f"{text} {unit}".strip()


def render_table(rows: list[Row]) -> str:
    header = ["scenario", "metric", "direct", "proxy", "ratio/added", "target", "result"]
    lines = [header]
    for row in rows:
        delta = row.delta
        if delta is None:
            shown = "-"
        elif row.compare == "ratio":
            shown = f"{delta:.2f}x"
        else:
            shown = f"{delta:+.3f} {row.unit}" if row.unit in ("ms", "s") else f"{delta:+.1f} {row.unit}"
        lines.append(
            [
                row.scenario,
                row.metric,
                _fmt(row.direct, row.unit),
                _fmt(row.proxy, row.unit),
                shown,
                row.target,
                row.status,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for index, line in enumerate(lines):
        out.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip())
        if index == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def summarize_profile(folded: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function, for the proxy's own code and overall."""
    total = 0
    self_all: Counter[str] = Counter()
    self_proxy: Counter[str] = Counter()
    inclusive_proxy: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    for line in folded.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame for frame in stack.split(";") if not frame.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        leaf = _frame_name(frames[-1])
        self_all[leaf] += count
        by_package[_package_of(frames[-1])] += count
        proxy_frames = [
            name
            for name in map(_frame_name, frames)
            if name.startswith("proxy/") and not name.startswith(("proxy/cli.py", "proxy/__main__.py"))
        ]
        if leaf.startswith("proxy/"):
            self_proxy[leaf] += count
        for name in set(proxy_frames):
            inclusive_proxy[name] += count

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": k, "pct": round(100 * v / max(total, 1), 1)} for k, v in counter.most_common(top)
        ]

    return {
        "samples": total,
        "self_top": share(self_all),
        "proxy_self_top": share(self_proxy),
        "proxy_inclusive_top": share(inclusive_proxy),
        "by_package": share(by_package),
    }


def _frame_name(frame: str) -> str:
    """`handle (proxy/transport.py:61)` -> `proxy/transport.py:handle` (line numbers dropped)."""
    match = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame)
    if match is None:
        return frame
    function, path = match.groups()
    for marker in ("/site-packages/", "/work/main/", str(ROOT) + "/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{function}"


def _package_of(frame: str) -> str:
    name = _frame_name(frame)
    path = name.split(":", 1)[0]
    if path.startswith("proxy/"):
        return path
    return path.split("/", 1)[0] if "/" in path else path


# --- scenarios ----------------------------------------------------------------------------------

Scenario = Callable[[Harness], tuple[list[Row], dict[str, Any]]]


def _noisy(*results: dict[str, Any]) -> bool:
    return any(r.get("other_cpu_pct", 0) > NOISE_LIMIT for r in results)


def _valid(*results: dict[str, Any]) -> bool:
    return all(r.get("valid", True) for r in results)


def _latency_rows(
    scenario: str, label: str, direct: dict[str, Any], proxied: dict[str, Any], targets: bool
) -> list[Row]:
    ok, noisy = _valid(direct, proxied), _noisy(direct, proxied)
    p50_added = proxied["p50_ms"] - direct["p50_ms"]
    p99_added = proxied["p99_ms"] - direct["p99_ms"]
    return [
        Row(scenario, f"{label} p50 latency, c=1", direct["p50_ms"], proxied["p50_ms"], "ms", "added",
            "added <= 0.4 ms" if targets else "", (p50_added <= 0.4) if targets else None, ok, noisy),
        Row(scenario, f"{label} p99 latency, c=1", direct["p99_ms"], proxied["p99_ms"], "ms", "added",
            "added <= 1 ms" if targets else "", (p99_added <= 1.0) if targets else None, ok, noisy),
    ]  # fmt: skip


def _throughput_row(
    scenario: str, metric: str, direct: dict[str, Any], proxied: dict[str, Any], minimum: float | None
) -> Row:
    ratio = proxied["rps"] / direct["rps"]
    return Row(
        scenario,
        metric,
        direct["rps"],
        proxied["rps"],
        "req/s",
        "ratio",
        f">= {minimum:g}x direct" if minimum is not None else "",
        (ratio >= minimum) if minimum is not None else None,
        _valid(direct, proxied),
        _noisy(direct, proxied),
    )


def _cost_row(scenario: str, metric: str, proxied: dict[str, Any]) -> Row:
    cost = proxied["proxy_cpu_us_per_request"]
    return Row(scenario, metric, None, cost, "us", "", valid=_valid(proxied), noisy=_noisy(proxied))


def _check_tenant_filled(body: bytes, tenant: str) -> None:
    if (
        f'\\"tenant_id\\": \\"{tenant}\\"'.encode() not in body
        and f'"tenant_id":"{tenant}"'.encode() not in body
    ):
        raise RuntimeError(f"the upstream did not see tenant_id={tenant}: {body[:300]!r}")


IDLE_PAUSE_SECONDS = 0.001


def _idle_penalty(h: Harness, up: Upstream, target: Target) -> tuple[list[Row], dict[str, Any]]:
    """What the upstream alone loses when it idles between requests, as it must behind any proxy
    at c=1: the same direct requests (one kept-alive connection, no proxy) back to back and with
    IDLE_PAUSE_SECONDS of busy-waiting in the client between them, in alternating blocks."""
    parts = re.match(r"http://([^:/]+):(\d+)(/.*)$", target.url)
    assert parts is not None, target.url
    connection = http.client.HTTPConnection(parts.group(1), int(parts.group(2)), timeout=30)
    count = 200 if h.settings.quick else 1000
    blocks: dict[str, list[tuple[float, float]]] = {"back_to_back": [], "paced": []}

    def block(pause: float) -> tuple[float, float]:
        latencies: list[float] = []
        cpu_before = up.proc.cpu_seconds()
        for request_id in range(count):
            began = time.perf_counter()
            connection.request("POST", parts.group(3), body=target.body(request_id), headers=target.headers)
            connection.getresponse().read()
            latencies.append(time.perf_counter() - began)
            resume = time.perf_counter() + pause
            while time.perf_counter() < resume:  # busy: only the upstream's core goes idle
                pass
        latencies.sort()
        return latencies[len(latencies) // 2] * 1000, (up.proc.cpu_seconds() - cpu_before) * 1e6 / count

    try:
        block(0.0)  # warm-up
        for _ in range(1 if h.settings.quick else 3):
            blocks["back_to_back"].append(block(0.0))
            blocks["paced"].append(block(IDLE_PAUSE_SECONDS))
    finally:
        connection.close()

    def median(runs: list[tuple[float, float]], index: int) -> float:
        return sorted(run[index] for run in runs)[len(runs) // 2]

    paced, back_to_back = blocks["paced"], blocks["back_to_back"]
    scenario, pause = "1 modern", f"{IDLE_PAUSE_SECONDS * 1000:g} ms"
    rows = [
        Row(scenario, f"upstream alone, p50 c=1: back to back | idle {pause} between requests",
            median(back_to_back, 0), median(paced, 0), "ms", "added"),
        Row(scenario, f"upstream alone, CPU per request: back to back | idle {pause} between",
            median(back_to_back, 1), median(paced, 1), "us", "added"),
    ]  # fmt: skip
    return rows, {"pause_seconds": IDLE_PAUSE_SECONDS, "requests_per_block": count, "blocks": blocks}


def s1_modern(h: Harness) -> tuple[list[Row], dict[str, Any]]:
    """tools/call, 2026-07-28 era, SDK upstream, full policy (tenant_id filled in, allow-list), no cache."""
    up = h.start_upstream("sdk")
    px = h.start_proxy({"acme": up.url})
    direct = modern_call("direct-call", up.url, "lookup", {"tenant_id": "acme", "key": "k1"})
    proxied = modern_call("proxy-call", px.url, "lookup", {"key": "k1"}, px.token("acme"))
    _check_tenant_filled(direct.probe(), "acme")
    _check_tenant_filled(proxied.probe(), "acme")
    rows, m = _against_targets(h, "1 modern", up, px, (direct, proxied), (direct, proxied))
    idle_rows, m["idle_penalty"] = _idle_penalty(h, up, direct)
    rows.extend(idle_rows)
    if h.settings.profile:
        m["profile"] = h.profile(px, proxied, 16, "s1_modern_c16")
        m["profile_c1"] = h.profile(px, proxied, 1, "s1_modern_c1")
    return rows, m


def s2_handshake(h: Harness) -> tuple[list[Row], dict[str, Any]]:
    """tools/call, handshake era (2025-11-25) with sessions; the SDK answers every POST with SSE."""
    up = h.start_upstream("sdk")
    px = h.start_proxy({"acme": up.url})
    token = px.token("acme")
    direct_sessions = sessions_for(up.url, 16)
    proxy_sessions = sessions_for(px.url, 16, token)
    direct = handshake_call(
        "direct-call", up.url, "lookup", {"tenant_id": "acme", "key": "k1"}, direct_sessions
    )
    proxied = handshake_call("proxy-call", px.url, "lookup", {"key": "k1"}, proxy_sessions, token)
    _check_tenant_filled(direct.probe(), "acme")
    _check_tenant_filled(proxied.probe(), "acme")
    single = (_single(direct), _single(proxied))  # c=1: one session
    return _against_targets(h, "2 handshake", up, px, single, (direct, proxied))


def _against_targets(
    h: Harness,
    scenario: str,
    up: Upstream,
    px: Proxy,
    at_c1: tuple[Target, Target],
    at_c16: tuple[Target, Target],
) -> tuple[list[Row], dict[str, Any]]:
    """Scenarios 1 and 2: (direct, proxied) tools/call at c=1 and c=16 against the issue's targets;
    the SDK upstream has a core to itself, the proxy shares the generator's."""
    layout = h.pin({up.proc: SUT_CORE, px.proc: GEN_CORE})
    m: dict[str, Any] = {
        "layout": {**layout, "generator": GEN_CORE if h.settings.pin else None},
        "direct_c1": h.load(at_c1[0], 1, {"upstream": up.proc}),
        "proxy_c1": h.load(at_c1[1], 1, {"upstream": up.proc, "proxy": px.proc}),
        "direct_c16": h.load(at_c16[0], 16, {"upstream": up.proc}),
        "proxy_c16": h.load(at_c16[1], 16, {"upstream": up.proc, "proxy": px.proc}),
    }
    rows = _latency_rows(scenario, "tools/call", m["direct_c1"], m["proxy_c1"], targets=True)
    rows.append(
        _throughput_row(scenario, "tools/call throughput, c=16", m["direct_c16"], m["proxy_c16"], 0.95)
    )
    rows.append(_cost_row(scenario, "proxy CPU per request, c=16", m["proxy_c16"]))
    return rows, m


def _single(target: Target) -> Target:
    return Target(
        target.name, target.url, target.headers, target.body_prefix, target.body_suffix, target.sessions[:1]
    )


def s3_cached(h: Harness) -> tuple[list[Row], dict[str, Any]]:
    """Cached tools/call (policy cache_ttl_seconds) and tools/list (upstream ttlMs), vs direct."""
    up = h.start_upstream("sdk", cache_hints=True)
    px = h.start_proxy({"acme": up.url}, policy=CACHED_POLICY, cache=True)
    token = px.token("acme")
    direct_call = modern_call("direct-call", up.url, "lookup", {"tenant_id": "acme", "key": "k1"})
    proxy_call = modern_call("proxy-cached-call", px.url, "lookup", {"key": "k1"}, token)
    direct_list = modern_list("direct-list", up.url)
    proxy_list = modern_list("proxy-cached-list", px.url, token)
    _check_tenant_filled(direct_call.probe(), "acme")
    _check_tenant_filled(proxy_call.probe(), "acme")
    direct_list.probe()
    if b"tenant_id" in proxy_list.probe():
        raise RuntimeError("the proxy's tools/list still shows tenant_id (hide_from_schema)")
    m: dict[str, Any] = {}
    layout_direct = h.pin({up.proc: SUT_CORE, px.proc: GEN_CORE})
    m["direct_call_c16"] = h.load(direct_call, 16, {"upstream": up.proc})
    m["direct_list_c16"] = h.load(direct_list, 16, {"upstream": up.proc})
    layout_proxy = h.pin({up.proc: GEN_CORE, px.proc: SUT_CORE})
    m["proxy_call_c16"] = h.load(proxy_call, 16, {"upstream": up.proc, "proxy": px.proc})
    m["proxy_list_c16"] = h.load(proxy_list, 16, {"upstream": up.proc, "proxy": px.proc})
    m["proxy_call_c1"] = h.load(proxy_call, 1, {"upstream": up.proc, "proxy": px.proc})
    m["direct_call_c1"] = h.load(direct_call, 1, {"upstream": up.proc})
    m["layout"] = {"direct": layout_direct, "proxy": layout_proxy}
    time.sleep(0.3)
    m["audit_cache_states"] = dict(px.audit_counts("acme"))
    scenario = "3 cached"
    call_c1 = (m["direct_call_c1"], m["proxy_call_c1"])
    rows = [
        _throughput_row(
            scenario, "cached tools/call throughput, c=16", m["direct_call_c16"], m["proxy_call_c16"], 3.0
        ),
        _throughput_row(
            scenario, "cached tools/list throughput, c=16", m["direct_list_c16"], m["proxy_list_c16"], None
        ),
        Row(
            scenario,
            "cached tools/call p50 latency, c=1",
            call_c1[0]["p50_ms"],
            call_c1[1]["p50_ms"],
            "ms",
            "added",
            valid=_valid(*call_c1),
            noisy=_noisy(*call_c1),
        ),
        _cost_row(scenario, "proxy CPU per cached tools/call", m["proxy_call_c16"]),
    ]
    hits = m["audit_cache_states"].get("hit", 0)
    total = sum(m["audit_cache_states"].values())
    rows.append(
        Row("3 cached", "audited requests answered from cache", None, 100 * hits / max(total, 1), "%", "")
    )
    return rows, m


NGINX_MISSING = "skipped: nginx is not installed (apt-get install -y nginx-light)"


def s4_ceiling(h: Harness) -> tuple[list[Row], dict[str, Any]]:
    """The proxy's own ceiling: a static JSON responder upstream, full policy, no cache."""
    up = h.start_upstream("static")
    px = h.start_proxy({"acme": up.url})
    direct = modern_call("direct-call", up.url, "lookup", {"tenant_id": "acme", "key": "k1"})
    proxied = modern_call("proxy-call", px.url, "lookup", {"key": "k1"}, px.token("acme"))
    direct.probe()
    proxied.probe()
    m: dict[str, Any] = {}
    layout_direct = h.pin({up.proc: SUT_CORE, px.proc: GEN_CORE})
    m["direct_c1"] = h.load(direct, 1, {"upstream": up.proc})
    m["direct_c16"] = h.load(direct, 16, {"upstream": up.proc})
    layout_proxy = h.pin({up.proc: GEN_CORE, px.proc: SUT_CORE})
    m["proxy_c1"] = h.load(proxied, 1, {"upstream": up.proc, "proxy": px.proc})
    m["proxy_c16"] = h.load(proxied, 16, {"upstream": up.proc, "proxy": px.proc})
    m["layout"] = {"direct": layout_direct, "proxy": layout_proxy}
    rows = _latency_rows("4 ceiling", "static upstream", m["direct_c1"], m["proxy_c1"], targets=False)
    rows.append(
        _throughput_row(
            "4 ceiling", "static upstream throughput, c=16", m["direct_c16"], m["proxy_c16"], None
        )
    )
    rows.append(
        Row("4 ceiling", "proxy CPU use at its ceiling", None, m["proxy_c16"]["proxy_cpu_pct"], "%", "",
            valid=_valid(m["proxy_c16"]), noisy=_noisy(m["proxy_c16"]))
    )  # fmt: skip
    rows.append(_cost_row("4 ceiling", "proxy CPU per request", m["proxy_c16"]))
    # The floor: a bare aiohttp forwarder (no auth, parsing, policy, audit) in the proxy's place;
    # a reference, not a proxy: the same forwarder with asyncio streams instead of ClientSession;
    # and the floor of any hop: nginx proxy_pass, one process, kept-alive upstream connections.
    for kind, label in (("forwarder", "bare aiohttp forwarder"),
                        ("streams-forwarder", "streams forwarder (no ClientSession)"),
                        ("nginx", "nginx proxy_pass")):  # fmt: skip
        key = kind.replace("-", "_")
        if kind == "nginx":
            found = h.start_nginx(up)
            if found is None:
                rows.append(Row("4 ceiling", NGINX_MISSING, None, None, "", ""))
                continue
            fw = found
        else:
            fw = h.start_upstream(kind, target=up.url)
        bare = modern_call(f"{kind}-call", fw.url, "lookup", {"tenant_id": "acme", "key": "k1"})
        bare.probe()
        m["layout"][key] = h.pin({up.proc: GEN_CORE, fw.proc: SUT_CORE})
        at_c1 = m[f"{key}_c1"] = h.load(bare, 1, {"upstream": up.proc, "proxy": fw.proc})
        at_c16 = m[f"{key}_c16"] = h.load(bare, 16, {"upstream": up.proc, "proxy": fw.proc})
        rows.append(
            Row("4 ceiling", f"{label} p50 latency, c=1", m["direct_c1"]["p50_ms"], at_c1["p50_ms"], "ms",
                "added", valid=_valid(at_c1), noisy=_noisy(at_c1))
        )  # fmt: skip
        rows.append(_throughput_row("4 ceiling", f"{label} throughput, c=16", m["direct_c16"], at_c16, None))
        rows.append(_cost_row("4 ceiling", f"{label} CPU per request", at_c16))
    if h.settings.profile:
        m["profile"] = h.profile(px, proxied, 16, "s4_ceiling_c16")
    return rows, m


def s5_sessions(h: Harness) -> tuple[list[Row], dict[str, Any]]:
    """Proxy RSS idle and with N open handshake-era sessions (initialize only; static upstream)."""
    count = h.settings.sessions
    up = h.start_upstream("static")
    px = h.start_proxy({"acme": up.url}, max_sessions=count + 100)
    token = px.token("acme")
    layout = h.pin({up.proc: GEN_CORE, px.proc: SUT_CORE})
    pin(os.getpid(), GEN_CORE if h.settings.pin else None)
    warm = modern_call("proxy-call", px.url, "lookup", {"key": "k1"}, token)
    for number in range(200):  # a warm proxy: pools, catalogs and first-use allocations in place
        http_request(warm.url, warm.body(number + 1), warm.headers)
    time.sleep(0.5)
    m: dict[str, Any] = {"layout": layout, "sessions": count, "rss_idle_mb": px.proc.rss_mb()}
    opened = asyncio.run(
        open_sessions(px.url, _auth(token), count, concurrency=32, send_initialized=False, keep_ids=False)
    )
    time.sleep(1.0)
    m["rss_sessions_mb"] = px.proc.rss_mb()
    m["open_seconds"] = opened["seconds"]
    m["opened"] = opened["opened"]
    m["open_failures"] = opened["failures"]
    m["bytes_per_session"] = (
        (m["rss_sessions_mb"] - m["rss_idle_mb"]) * 1024 * 1024 / max(opened["opened"], 1)
    )
    ok = opened["opened"] == count
    scenario = "5 sessions"
    full = count >= 10_000
    rss = m["rss_sessions_mb"]
    rows = [
        Row(scenario, "proxy RSS, idle", None, m["rss_idle_mb"], "MB", ""),
        Row(
            scenario,
            f"proxy RSS, {count:,} idle sessions",
            None,
            rss,
            "MB",
            "",
            "<= 150 MB" if full else "(10,000 in a full run)",
            (rss <= 150) if full else None,
            ok,
        ),
        Row(scenario, "proxy memory per session", None, m["bytes_per_session"] / 1024, "KiB", "", valid=ok),
        Row(
            scenario, "sessions opened per second", None, m["opened"] / m["open_seconds"], "/s", "", valid=ok
        ),
    ]
    return rows, m


def s5_tenants(h: Harness) -> tuple[list[Row], dict[str, Any]]:
    """Start-up, RSS and per-request cost with 1,000 configured tenants vs 2 (static upstream)."""
    count = h.settings.tenants
    up = h.start_upstream("static")
    m: dict[str, Any] = {"tenants": count}
    names = [f"t{i:04d}" for i in range(1, count + 1)]

    small = h.start_proxy({names[0]: up.url, names[1]: up.url})
    small_rss = small.proc.rss_mb()
    big = h.start_proxy(dict.fromkeys(names, up.url))
    big_rss = big.proc.rss_mb()
    targets = {
        "two_first": (small, names[0]),
        "many_first": (big, names[0]),
        "many_last": (big, names[-1]),
    }
    calls = {
        key: modern_call(f"proxy-call-{tenant}", proxy.url, "lookup", {"key": "k1"}, proxy.token(tenant))
        for key, (proxy, tenant) in targets.items()
    }
    for call in calls.values():
        call.probe()
    loads: dict[str, list[dict[str, Any]]] = {key: [] for key in targets}
    # Rounds alternate the three measurements (the measured proxy alone on its core; the other
    # idle), and the best round of each counts: noise only ever adds latency.
    for _ in range(h.settings.tenant_rounds):
        for key, (proxy, _tenant) in targets.items():
            idle = big if proxy is small else small
            layout = h.pin({up.proc: GEN_CORE, idle.proc: GEN_CORE, proxy.proc: SUT_CORE})
            m.setdefault("layout", layout)
            loads[key].append(
                h.load(calls[key], 1, {"proxy": proxy.proc}, duration=h.settings.tenant_duration)
            )

    def best(key: str) -> dict[str, Any]:
        return min(loads[key], key=lambda result: result["p50_ms"])

    m["rounds"] = loads
    m["two"] = {"startup_seconds": small.startup_seconds, "rss_mb": small_rss, "first": best("two_first")}
    m["many"] = {
        "startup_seconds": big.startup_seconds,
        "rss_mb": big_rss,
        "first": best("many_first"),
        "last": best("many_last"),
    }
    two, many = m["two"], m["many"]
    base = two["first"]["p50_ms"]
    base_cost = two["first"]["proxy_cpu_us_per_request"]

    def same(cost: float) -> bool:  # more tenants must not cost more per request (less is noise)
        return cost - base_cost <= max(0.1 * base_cost, 30.0)

    ok = _valid(two["first"], many["first"], many["last"])
    noisy = _noisy(two["first"], many["first"], many["last"])
    scenario, within = "5 tenants", "<= +10% (#1 and #1,000)"
    rows = [
        Row(
            scenario,
            f"proxy start-up to /healthz (2 vs {count:,} tenants)",
            two["startup_seconds"],
            many["startup_seconds"],
            "s",
            "added",
            "< 2 s",
            many["startup_seconds"] < 2.0,
        ),
        Row(
            scenario,
            f"proxy RSS after start-up (2 vs {count:,} tenants)",
            two["rss_mb"],
            many["rss_mb"],
            "MB",
            "added",
        ),
        Row(
            scenario,
            f"p50 c=1, tenant #1 (2 vs {count:,} tenants)",
            base,
            many["first"]["p50_ms"],
            "ms",
            "added",
            valid=ok,
            noisy=noisy,
        ),
        Row(
            scenario,
            f"p50 c=1, tenant #{count:,} (vs #1 of 2)",
            base,
            many["last"]["p50_ms"],
            "ms",
            "added",
            valid=ok,
            noisy=noisy,
        ),
        Row(
            scenario,
            f"proxy CPU/request, tenant #{count:,} (vs #1 of 2)",
            base_cost,
            many["last"]["proxy_cpu_us_per_request"],
            "us",
            "ratio",
            within,
            same(many["last"]["proxy_cpu_us_per_request"])
            and same(many["first"]["proxy_cpu_us_per_request"]),
            ok,
            noisy,
        ),
    ]
    return rows, m


def s6_sse(h: Harness) -> tuple[list[Row], dict[str, Any]]:
    """SSE relay: a tools/call answered with a stream of progress notifications (static upstream)."""
    up = h.start_upstream("static")
    px = h.start_proxy({"acme": up.url})
    token = px.token("acme")
    meta = (
        f'"_meta":{{"progressToken":"p-__ID__","io.modelcontextprotocol/protocolVersion":"{MODERN_VERSION}",'
        '"io.modelcontextprotocol/clientCapabilities":{}}'
    )
    template = (
        '{"jsonrpc":"2.0","id":__ID__,"method":"tools/call","params":'
        f'{{"name":"stream_events","arguments":{{"n":__N__}},{meta}}}}}'
    )
    headers = {
        **BASE_HEADERS,
        "MCP-Protocol-Version": MODERN_VERSION,
        "Mcp-Method": "tools/call",
        "Mcp-Name": "stream_events",
    }
    m: dict[str, Any] = {}
    layout_direct = h.pin({up.proc: SUT_CORE, px.proc: GEN_CORE})
    m["direct"] = h.sse(up.url, headers, template, {"upstream": up.proc})
    layout_proxy = h.pin({up.proc: GEN_CORE, px.proc: SUT_CORE})
    m["proxy"] = h.sse(px.url, {**headers, **_auth(token)}, template, {"upstream": up.proc, "proxy": px.proc})
    m["layout"] = {"direct": layout_direct, "proxy": layout_proxy}
    d, p = m["direct"], m["proxy"]
    expected = h.settings.stream_events + 1
    ok = all(n == expected for n in d["events_per_stream"] + p["events_per_stream"])
    noisy = _noisy(d, p)
    rows = [
        Row("6 SSE", "time to first event, p50", d["ttfe_p50_ms"], p["ttfe_p50_ms"], "ms", "added",
            valid=ok, noisy=noisy),
        Row("6 SSE", "time to first event, p90", d["ttfe_p90_ms"], p["ttfe_p90_ms"], "ms", "added",
            valid=ok, noisy=noisy),
        Row("6 SSE", f"events/s ({h.settings.stream_events:,}-event stream)", d["events_per_second"],
            p["events_per_second"], "ev/s", "ratio", valid=ok, noisy=noisy),
    ]  # fmt: skip
    return rows, m


def s7_redis(h: Harness) -> tuple[list[Row], dict[str, Any]]:
    """Shared state in Redis (state.backend: redis) vs in process, each vs direct, in one run:
    cached tools/call (a Redis GET per answer), modern tools/call under rate and concurrency
    limits (a limiter script per request), handshake tools/call (a session lookup script and the
    limiter per request); the last two are forwarded to the upstream (not cached)."""
    up = h.start_upstream("sdk")
    redis_url = h.start_redis()
    limits = {"limits": {"requests_per_second": 1_000_000, "max_concurrent": 10_000}}
    memory = h.start_proxy({"acme": up.url}, policy=CACHED_POLICY, cache=True, extra=limits)
    shared = h.start_proxy(
        {"acme": up.url}, policy=CACHED_POLICY, cache=True,
        extra={**limits, "state": {"backend": "redis", "url": redis_url, "key_prefix": "bench"}},
    )  # fmt: skip
    direct_sessions = sessions_for(up.url, 16)
    targets: dict[str, dict[str, Target]] = {"direct": {}, "memory": {}, "redis": {}}
    targets["direct"]["cached"] = modern_call(
        "direct-call", up.url, "lookup", {"tenant_id": "acme", "key": "k1"}
    )
    targets["direct"]["forwarded"] = modern_call("direct-whoami", up.url, "whoami", {})
    targets["direct"]["handshake"] = handshake_call("direct-hs", up.url, "whoami", {}, direct_sessions)
    for name, px in (("memory", memory), ("redis", shared)):
        token = px.token("acme")
        targets[name]["cached"] = modern_call(f"{name}-cached", px.url, "lookup", {"key": "k1"}, token)
        targets[name]["forwarded"] = modern_call(f"{name}-whoami", px.url, "whoami", {}, token)
        targets[name]["handshake"] = handshake_call(
            f"{name}-hs", px.url, "whoami", {}, sessions_for(px.url, 16, token), token
        )
    for group in targets.values():
        for target in group.values():
            target.probe()
    m: dict[str, Any] = {}
    layout_direct = h.pin({up.proc: SUT_CORE, memory.proc: GEN_CORE, shared.proc: GEN_CORE})
    for kind, target in targets["direct"].items():
        m[f"direct_{kind}_c16"] = h.load(target, 16, {"upstream": up.proc})
        m[f"direct_{kind}_c1"] = h.load(
            _single(target) if target.sessions else target, 1, {"upstream": up.proc}
        )
    layout_proxy: dict[str, Any] = {}
    for name, px in (("memory", memory), ("redis", shared)):
        other = shared if px is memory else memory
        layout_proxy[name] = h.pin({up.proc: GEN_CORE, other.proc: GEN_CORE, px.proc: SUT_CORE})
        for kind, target in targets[name].items():
            watch = {"upstream": up.proc, "proxy": px.proc}
            m[f"{name}_{kind}_c16"] = h.load(target, 16, watch)
            m[f"{name}_{kind}_c1"] = h.load(_single(target) if target.sessions else target, 1, watch)
    m["layout"] = {"direct": layout_direct, "proxy": layout_proxy}
    rows: list[Row] = []
    labels = {
        "cached": "cached tools/call",
        "forwarded": "rate-limited tools/call",
        "handshake": "handshake tools/call",
    }
    for kind, label in labels.items():
        for name in ("memory", "redis"):
            direct, proxied = m[f"direct_{kind}_c16"], m[f"{name}_{kind}_c16"]
            rows.append(
                _throughput_row("7 redis", f"{label} throughput c=16, {name} state", direct, proxied, None)
            )
            one = (m[f"direct_{kind}_c1"], m[f"{name}_{kind}_c1"])
            rows.append(
                Row("7 redis", f"{label} p50 latency c=1, {name} state", one[0]["p50_ms"], one[1]["p50_ms"],
                    "ms", "added", valid=_valid(*one), noisy=_noisy(*one))
            )  # fmt: skip
    return rows, m


def _instructions_per_request(proc: Proc, target: Target, count: int, output: Path) -> float:
    """Instructions `proc` (running under callgrind, instrumentation off) executes per request:
    a warm-up, then exactly `count` requests on one kept-alive connection counted, nothing else."""
    parts = re.match(r"http://([^:/]+):(\d+)(/.*)$", target.url)
    assert parts is not None, target.url
    connection = http.client.HTTPConnection(parts.group(1), int(parts.group(2)), timeout=120)

    def send(first: int, how_many: int) -> None:
        for request_id in range(first, first + how_many):
            body = target.body(request_id) if target.http_method == "POST" else None
            connection.request(target.http_method, parts.group(3), body=body, headers=target.headers)
            response = connection.getresponse()
            if response.status != target.status or target.expect.encode() not in response.read():
                raise RuntimeError(f"{target.name}: unexpected answer HTTP {response.status}")

    try:
        send(1, 30)
        subprocess.run(["callgrind_control", "--instr=on", str(proc.pid)], check=True, capture_output=True)
        send(1000, count)
        subprocess.run(["callgrind_control", "--instr=off", str(proc.pid)], check=True, capture_output=True)
    finally:
        connection.close()
    proc.popen.send_signal(signal.SIGTERM)  # callgrind writes its counts as the process exits
    proc.popen.wait(timeout=300)
    totals = re.search(r"^totals: (\d+)", output.read_text(errors="replace"), re.MULTILINE)
    if totals is None:
        raise RuntimeError(f"no callgrind totals in {output}")
    return int(totals.group(1)) / count


def s8_instructions(h: Harness) -> tuple[list[Row], dict[str, Any]]:
    """Instructions per request (valgrind's callgrind), all against the static upstream: forwarded
    tools/call through the bare aiohttp forwarder, nginx proxy_pass (the floor of any hop) and the
    proxy with full policy (also configured with 1,000 tenants, the last one called); a cached
    tools/call and a request refused by a rate limit (429). Unlike times, these counts do not move
    with other load on the machine: the figures to compare the proxy's own cost by."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        skipped = Row("8 instructions", "skipped: valgrind is not installed", None, None, "", "")
        return [skipped], {"skipped": "valgrind is not installed"}
    up = h.start_upstream("static")
    names = [f"t{i:04d}" for i in range(1, h.settings.tenants + 1)]
    counts: dict[str, float] = {}
    kinds = ("forwarder", "streams_forwarder", "nginx", "proxy", "proxy_many_tenants", "proxy_cached",
             "proxy_refused")  # fmt: skip
    for name in kinds:
        output = h.tmp / f"callgrind-{name}.out"
        wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={output}", "--instr-atstart=no"]
        if name in ("forwarder", "streams_forwarder", "nginx"):
            fw = h.start_nginx(up, wrap=wrap) if name == "nginx" else (
                h.start_upstream(name.replace("_", "-"), target=up.url, wrap=wrap))  # fmt: skip
            if fw is None:
                continue
            proc = fw.proc
            target = modern_call(f"{name}-call", fw.url, "lookup", {"tenant_id": "acme", "key": "k1"})
        elif name == "proxy_cached":
            px = h.start_proxy({"acme": up.url}, policy=CACHED_POLICY, cache=True, wrap=wrap)
            proc = px.proc
            target = modern_call(f"{name}-call", px.url, "lookup", {"key": "k1"}, px.token("acme"))
            target.probe()  # stored: every counted request is a hit
        elif name == "proxy_refused":
            px = h.start_proxy({"acme": up.url}, tenant_limits={"acme": REFUSED_LIMITS}, wrap=wrap)
            proc = px.proc
            with contextlib.suppress(RuntimeError):
                _refused_call(px, "acme").probe()  # (the first one is within its burst)
            target = _refused_call(px, "acme")
        else:
            tenants = {"acme": up.url} if name == "proxy" else dict.fromkeys(names, up.url)
            px = h.start_proxy(tenants, wrap=wrap)
            proc = px.proc
            caller = "acme" if name == "proxy" else names[-1]
            target = modern_call(f"{name}-call", px.url, "lookup", {"key": "k1"}, px.token(caller))
        counts[name] = _instructions_per_request(proc, target, h.settings.counted_requests, output)
    many = f"tenant #{len(names):,} of {len(names):,}"
    scenario = "8 instructions"
    rows = [
        Row(scenario, "instructions per tools/call (forwarder | proxy)", counts["forwarder"],
            counts["proxy"], "", "ratio"),
        Row(scenario, "the proxy's own instructions per tools/call", None,
            counts["proxy"] - counts["forwarder"], "", ""),
        Row(scenario, "proxy instructions per forwarded tools/call", None, counts["proxy"], "", "",
            "<= 600,000", counts["proxy"] <= 600_000),
        Row(scenario, "proxy instructions per cached tools/call", None, counts["proxy_cached"], "", "",
            "<= 150,000", counts["proxy_cached"] <= 150_000),
        Row(scenario, "proxy instructions per refused request (429)", None, counts["proxy_refused"], "",
            "", "<= 120,000", counts["proxy_refused"] <= 120_000),
        Row(scenario, f"proxy instructions per tools/call (1 tenant | {many})", counts["proxy"],
            counts["proxy_many_tenants"], "", "ratio"),
        Row(scenario, "forwarder instructions per tools/call (ClientSession | asyncio streams)",
            counts["forwarder"], counts["streams_forwarder"], "", "ratio"),
    ]  # fmt: skip
    if "nginx" in counts:
        rows.append(Row(scenario, "instructions per tools/call (nginx proxy_pass | proxy)", counts["nginx"],
                        counts["proxy"], "", "ratio"))  # fmt: skip
    else:
        rows.append(Row(scenario, NGINX_MISSING, None, None, "", ""))
    return rows, {"instructions_per_request": counts, "counted_requests": h.settings.counted_requests}


REFUSED_LIMITS = {"requests_per_second": 0.001, "burst": 1}  # after its first request: all 429
FLOOD_CONNECTIONS, FLOOD_DELAY_MS = 8, 12  # about 600 refused requests a second, as in the report


def _refused_call(px: Proxy, tenant: str) -> Target:
    target = modern_call(f"refused-{tenant}", px.url, "lookup", {"key": "k1"}, px.token(tenant))
    target.status, target.expect = 429, '"code":-32009'
    return target


def _flood(h: Harness, target: Target, connections: int = FLOOD_CONNECTIONS) -> Proc:
    """A wrk load in the background, paced by the target's delay (its summary is written when it
    is stopped with SIGINT)."""
    script = h._path(f"wrk-{target.name}", ".lua")
    script.write_text(target.lua())
    argv = [
        *(["taskset", "-c", str(GEN_CORE)] if h.settings.pin else []),
        "wrk", "-t1", f"-c{connections}", "-d3600s", "--timeout", "30s", "-s", str(script), target.url,
    ]  # fmt: skip
    proc = Proc("flood", argv, h._path("flood", ".log"), h.env)
    h.procs.append(proc)
    return proc


def _flood_result(proc: Proc) -> dict[str, Any]:
    proc.popen.send_signal(signal.SIGINT)
    proc.popen.wait(timeout=30)
    match = re.search(r"^BENCHJSON (\{.*\})$", proc.log.read_text(errors="replace"), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"the flood generator wrote no summary:\n{proc.tail()}")
    raw = json.loads(match.group(1))
    seconds = raw["duration_us"] / 1e6
    return {"requests": raw["requests"], "seconds": seconds, "rps": raw["requests"] / seconds,
            "bad": raw["bad"], "p50_ms": raw["p50_us"] / 1000}  # fmt: skip


def s9_refusals(h: Harness) -> tuple[list[Row], dict[str, Any]]:
    """Refusals are cheap: tenant A's p50 at c=1 alone and while tenant B floods with requests its
    rate limit refuses (429, about 600/s); instructions per refused request against a forwarded one
    (callgrind, as in s8), static upstream."""
    up = h.start_upstream("static")
    tenants = {"acme": up.url, "globex": up.url}
    px = h.start_proxy(tenants, tenant_limits={"globex": REFUSED_LIMITS})
    victim = modern_call("victim-call", px.url, "lookup", {"key": "k1"}, px.token("acme"))
    victim.probe()
    with contextlib.suppress(RuntimeError):
        modern_call("first", px.url, "lookup", {"key": "k1"}, px.token("globex")).probe()  # its burst
    flood = _refused_call(px, "globex")
    flood.probe()
    flood.delay_ms = FLOOD_DELAY_MS
    m: dict[str, Any] = {"flood_connections": FLOOD_CONNECTIONS, "flood_delay_ms": FLOOD_DELAY_MS}
    rows: list[Row] = []
    if h.settings.generator == "wrk":
        m["layout"] = h.pin({up.proc: GEN_CORE, px.proc: SUT_CORE})
        quiet = h.load(victim, 1, {"proxy": px.proc})
        flooder = _flood(h, flood)
        flooded = h.load(victim, 1, {"proxy": px.proc, "flood": flooder})
        m.update(quiet=quiet, flooded=flooded, flood=_flood_result(flooder))
        one = (quiet, flooded)
        rows.append(Row("9 refusals", f"tenant A p50 c=1 (alone | B flooding, {m['flood']['rps']:.0f} 429/s)",
                        quiet["p50_ms"], flooded["p50_ms"], "ms", "added", valid=_valid(*one)
                        and m["flood"]["bad"] == 0, noisy=_noisy(*one)))  # fmt: skip
        rows.append(Row("9 refusals", "proxy CPU while B floods (A alone | A and B's flood)",
                        quiet["proxy_cpu_pct"], flooded["proxy_cpu_pct"], "%", "added"))  # fmt: skip
    else:
        rows.append(Row("9 refusals", "skipped: the paced flood needs wrk", None, None, "", ""))
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        rows.append(Row("9 refusals", "skipped: valgrind is not installed", None, None, "", ""))
        return rows, m
    counts: dict[str, float] = {}
    for name in ("forwarded", "refused", "healthz"):
        output = h.tmp / f"callgrind-s9-{name}.out"
        wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={output}", "--instr-atstart=no"]
        counted = h.start_proxy(tenants, tenant_limits={"globex": REFUSED_LIMITS}, wrap=wrap)
        if name == "forwarded":
            target = modern_call(
                "forwarded-call", counted.url, "lookup", {"key": "k1"}, counted.token("acme")
            )
        elif name == "healthz":  # what any request costs aiohttp's server: the floor of a refusal
            target = Target("healthz", counted.url.replace("/mcp", "/healthz"), {}, "", "", expect='"ok"')
            target.http_method = "GET"
        else:
            with contextlib.suppress(RuntimeError):
                _refused_call(counted, "globex").probe()  # (the first one is within its burst)
            target = _refused_call(counted, "globex")
        counts[name] = _instructions_per_request(counted.proc, target, h.settings.counted_requests, output)
    m["instructions_per_request"] = counts
    share = counts["refused"] / counts["forwarded"]
    rows.append(Row("9 refusals", "instructions per request (forwarded | refused 429)", counts["forwarded"],
                    counts["refused"], "", "ratio", "<= 0.2", share <= 0.2))  # fmt: skip
    rows.append(Row("9 refusals", "instructions per request (forwarded | GET /healthz, aiohttp's floor)",
                    counts["forwarded"], counts["healthz"], "", "ratio"))  # fmt: skip
    return rows, m


IDLE_SECONDS = 10  # s10: a template tenant unused this long is dropped (more than a wave of 1,000 takes)


def s10_templates(h: Harness) -> tuple[list[Row], dict[str, Any]]:
    """100,000 tenants served by one template (an allowlist file names them all) against a config of
    one tenant: start-up, RSS, instructions per request (callgrind) of tenant #1 and #100,000; then
    1,000 distinct tenants active and left idle, and 1,000 others: heap blocks in use and RSS
    before, at the peak, and once the idle sweep has dropped them."""
    count, active = h.settings.template_tenants, h.settings.active_tenants
    names = [f"t{i:06d}" for i in range(1, count + 1)]
    allowlist = h._path("allowlist", ".txt")
    allowlist.write_text("\n".join(names) + "\n")
    up = h.start_upstream("static")

    def templated(idle_seconds: float, wrap: list[str] | None = None) -> Proxy:
        template = {"match": "t[0-9]{6}", "upstream": {"url": up.url}, "policy": "bench"}
        template["idle_seconds"] = idle_seconds
        extra = {"tenant_templates": [template], "tenant_allowlist": {"file": str(allowlist)}}
        return h.start_proxy({}, extra=extra, wrap=wrap)

    one = h.start_proxy({names[0]: up.url})
    many = templated(idle_seconds=IDLE_SECONDS)
    m: dict[str, Any] = {"tenants": count, "active": active}
    m["one"] = {"startup_seconds": one.startup_seconds, "rss_mb": one.proc.rss_mb()}
    m["many"] = {"startup_seconds": many.startup_seconds, "rss_mb": many.proc.rss_mb()}
    one.proc.stop()

    # 1,000 tenants active, then idle: memory of the warm proxy with no tenant active, at the peak, after.
    layout = h.pin({up.proc: GEN_CORE, many.proc: SUT_CORE})
    pin(os.getpid(), GEN_CORE if h.settings.pin else None)
    warm = modern_call("warm", many.url, "lookup", {"key": "k1"}, many.token(names[0]))
    for number in range(200):
        http_request(warm.url, warm.body(number + 1), warm.headers)

    def settled(value: float, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while many.gauge("mcp_proxy_tenants") != value:
            if time.monotonic() > deadline:
                raise RuntimeError(f"mcp_proxy_tenants did not reach {value:g}")
            time.sleep(0.25)

    def wave(tenants: list[str]) -> None:
        """Each tenant active (two tools/call), all within IDLE_SECONDS (tokens minted first)."""
        calls = [modern_call("one", many.url, "lookup", {"key": "k1"}, many.token(t)) for t in tenants]
        for call in calls:
            call.probe()
            http_request(call.url, call.body(2), call.headers)

    def memory(stage: str) -> None:
        m[f"rss_{stage}_mb"] = many.proc.rss_mb()
        m[f"heap_blocks_{stage}"] = many.gauge("mcp_proxy_heap_blocks")

    step = max(1, count // active)
    first, second = names[::step][:active], names[1::step][:active]  # from #1 to near #100,000
    settled(0)
    memory("before")
    wave(first)
    m["active_tenants_seen"] = many.gauge("mcp_proxy_tenants")
    memory("active")
    settled(0)
    memory("after")
    wave(second)  # 1,000 other tenants: the memory the first left behind is used again
    settled(0)
    memory("after_second")
    m["layout"] = layout
    many.proc.stop()

    counts: dict[str, float] = {}
    if shutil.which("valgrind") is not None and shutil.which("callgrind_control") is not None:
        for key, tenant in (("one_first", names[0]), ("many_first", names[0]), ("many_last", names[-1])):
            output = h.tmp / f"callgrind-s10-{key}.out"
            wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={output}", "--instr-atstart=no"]
            px = h.start_proxy({names[0]: up.url}, wrap=wrap) if key == "one_first" else templated(3600, wrap)
            target = modern_call(f"s10-{key}", px.url, "lookup", {"key": "k1"}, px.token(tenant))
            counts[key] = _instructions_per_request(px.proc, target, h.settings.counted_requests, output)
    m["instructions_per_request"] = counts

    scenario = "10 templates"
    one_m, many_m = m["one"], m["many"]
    rows = [
        Row(scenario, f"proxy start-up to /healthz (1 tenant | {count:,} from a template)",
            one_m["startup_seconds"], many_m["startup_seconds"], "s", "added", "< 2 s",
            many_m["startup_seconds"] < 2.0),
        Row(scenario, f"proxy RSS after start-up (1 tenant | {count:,} from a template)", one_m["rss_mb"],
            many_m["rss_mb"], "MB", "ratio", "<= 1.10x", many_m["rss_mb"] <= 1.10 * one_m["rss_mb"]),
        Row(scenario, f"proxy RSS, no tenant active | {active:,} tenants active", m["rss_before_mb"],
            m["rss_active_mb"], "MB", "added", valid=m["active_tenants_seen"] == active),
        Row(scenario, f"heap blocks in use, before | after {active:,} tenants went idle",
            m["heap_blocks_before"], m["heap_blocks_after"], "", "ratio", "<= 1.10x",
            m["heap_blocks_after"] <= 1.10 * m["heap_blocks_before"]),
        Row(scenario, f"proxy RSS, before | after {active:,} tenants went idle", m["rss_before_mb"],
            m["rss_after_mb"], "MB", "ratio"),
        Row(scenario, f"proxy RSS, after {active:,} tenants | after {active:,} others, both idle",
            m["rss_after_mb"], m["rss_after_second_mb"], "MB", "ratio"),
    ]  # fmt: skip
    if counts:
        rows += [
            Row(scenario, f"instructions per tools/call (tenant #1 of 1 | #1 of {count:,})",
                counts["one_first"], counts["many_first"], "", "ratio"),
            Row(scenario, f"instructions per tools/call (tenant #1 | #{count:,} of {count:,})",
                counts["many_first"], counts["many_last"], "", "ratio", "<= 1.05x",
                counts["many_last"] <= 1.05 * counts["many_first"]),
        ]  # fmt: skip
    else:
        rows.append(Row(scenario, "instructions: skipped, valgrind is not installed", None, None, "", ""))
    return rows, m


REJECTING_POLICY = FULL_POLICY.replace("on_mismatch: rewrite", "on_mismatch: reject")
WORST_IN_FLIGHT = 3
WORST_BODY_BYTES = 4 * 1024 * 1024 - 4096  # just under listen.max_body_bytes (4 MiB by default)


def _worst_case_arguments() -> dict[str, dict[str, Any]]:
    """tools/call arguments of about 4 MB naming another tenant, refused without an upstream call:
    the shape of issue 26's report (350,000 members: refused by listen.max_json_members), and JSON
    documents held in strings (each within the members bound, as the policy looks into them)."""
    members = {"tenant_id": "acme", **{f"k{i}": 1 for i in range(350_000)}}
    document = "[" + ",".join(["[]"] * 9_000) + "]"
    count = WORST_BODY_BYTES // (len(document) + 16)
    documents = {"tenant_id": "acme", **{f"d{i}": document for i in range(count)}}
    return {"350,000 members": members, "JSON documents in strings": documents}


WORST_BYTES_PER_SECOND = 1_000_000  # the last row: B's limits.bytes_per_second


def _worst_case_row(
    h: Harness, px: Proxy, up: Upstream, shape: str, arguments: dict[str, Any], limited: bool
) -> tuple[Row, dict[str, Any]]:
    """Tenant A's p50 at c=1 alone, then while B keeps WORST_IN_FLIGHT refused requests in flight."""
    victim = modern_call("victim-call", px.url, "lookup", {"key": "k1"}, px.token("acme"))
    victim.probe()
    attack = modern_call("worst-case", px.url, "lookup", arguments, px.token("globex"))
    status, _, answer = http_request(attack.url, attack.body(), attack.headers)
    if b'"error"' not in answer or len(attack.body()) > WORST_BODY_BYTES + 1024:
        raise RuntimeError(f"{shape}: not refused as expected: HTTP {status} {answer[:200]!r}")
    refusal = json.loads(answer)["error"]
    attack.status, attack.expect = (429, '"error"') if limited else (status, '"error"')
    m: dict[str, Any] = {"shape": shape, "bytes": len(attack.body()), "status": status,
                         "code": refusal["code"], "message": refusal["message"],
                         "layout": h.pin({up.proc: GEN_CORE, px.proc: SUT_CORE})}  # fmt: skip
    m["alone"] = alone = h.load(victim, 1, {"proxy": px.proc})
    flooder = _flood(h, attack, WORST_IN_FLIGHT)
    try:
        m["attacked"] = attacked = h.load(victim, 1, {"proxy": px.proc, "flood": flooder})
    finally:
        m["flood"] = flood = _flood_result(flooder)
    answered = f"{refusal['code']}" + (f", then 429 over {WORST_BYTES_PER_SECOND:,} B/s" if limited else "")
    metric = (f"tenant A p50 c=1 (alone | B keeps {WORST_IN_FLIGHT} x {len(attack.body()) / 1e6:.1f} MB in "
              f"flight: {shape}, {answered}; {flood['rps']:.1f}/s)")  # fmt: skip
    ratio = attacked["p50_ms"] / alone["p50_ms"]
    row = Row("11 worst case", metric, alone["p50_ms"], attacked["p50_ms"], "ms", "ratio", "<= 1.5x",
              ratio <= 1.5, _valid(alone, attacked), _noisy(alone, attacked))  # fmt: skip
    return row, m


def s11_worst_case(h: Harness) -> tuple[list[Row], dict[str, Any]]:
    """One tenant keeps three worst-case refused requests in flight (about 4 MB each, naming another
    tenant); another tenant's tools/call p50 at c=1 against its p50 alone (static upstream, the
    proxy alone on its core, every generator and the upstream on the other). With the defaults, then
    with B held to a bytes-per-second limit."""
    if h.settings.generator != "wrk":
        return [Row("11 worst case", "skipped: the background load needs wrk", None, None, "", "")], {}
    up = h.start_upstream("static")
    tenants = {"acme": up.url, "globex": up.url}
    px = h.start_proxy(tenants, policy=REJECTING_POLICY)
    rows: list[Row] = []
    m: dict[str, Any] = {"in_flight": WORST_IN_FLIGHT}
    shapes = _worst_case_arguments()
    for index, (shape, arguments) in enumerate(shapes.items()):
        row, m[f"defaults_{index}"] = _worst_case_row(h, px, up, shape, arguments, limited=False)
        rows.append(row)
    limits = {"globex": {"bytes_per_second": WORST_BYTES_PER_SECOND}}
    limited = h.start_proxy(tenants, policy=REJECTING_POLICY, tenant_limits=limits)
    shape = "JSON documents in strings"
    row, m["limited"] = _worst_case_row(h, limited, up, shape, shapes[shape], limited=True)
    rows.append(row)
    return rows, m


SCENARIOS: dict[str, Scenario] = {
    "s1_modern": s1_modern,
    "s2_handshake": s2_handshake,
    "s3_cached": s3_cached,
    "s4_ceiling": s4_ceiling,
    "s5_sessions": s5_sessions,
    "s5_tenants": s5_tenants,
    "s6_sse": s6_sse,
    "s7_redis": s7_redis,
    "s8_instructions": s8_instructions,
    "s9_refusals": s9_refusals,
    "s10_templates": s10_templates,
    "s11_worst_case": s11_worst_case,
}


# --- main -----------------------------------------------------------------------------------------


def find_generator(choice: str) -> str:
    """wrk when installed (one `apt-get install -y wrk` attempt when it is not), else aiohttp."""
    if choice == "aiohttp":
        return "aiohttp"
    if shutil.which("wrk") is None and choice in ("auto", "wrk"):
        marker = Path(tempfile.gettempdir()) / "mcp-bench-wrk-install-tried"
        if not marker.exists() and shutil.which("apt-get") and os.geteuid() == 0:
            marker.touch()
            print("wrk is not installed: trying `apt-get install -y wrk` once ...", flush=True)
            subprocess.run(
                ["apt-get", "install", "-y", "-q", "wrk"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=300,
                check=False,
            )
    if shutil.which("wrk") is not None:
        return "wrk"
    if choice == "wrk":
        raise SystemExit("wrk is not installed and could not be installed")
    print("wrk is not available: using the aiohttp load generator", flush=True)
    return "aiohttp"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("mcp-tenant-proxy", "aiohttp", "uvloop", "mcp", "uvicorn", "httptools"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    if shutil.which("wrk"):
        done = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
        found["wrk"] = (done.stdout or done.stderr).split("\n", 1)[0].strip()
    return found


def _git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "modified": git("status", "--porcelain", "--", "proxy").splitlines(),
    }


@contextlib.contextmanager
def harness(settings: Settings) -> Iterator[Harness]:
    tmp = Path(tempfile.mkdtemp(prefix="mcp-bench-"))
    h = Harness(settings, tmp)
    try:
        yield h
    finally:
        h.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (~1 minute)")
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS), help="run only this scenario")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "latest.json"), help="JSON output")
    parser.add_argument("--generator", choices=["auto", "wrk", "aiohttp"], default="auto")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--proxy-log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--profile", action="store_true", help="py-spy profile of the proxy in s1 and s4")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=20,
        metavar="SECONDS",
        help="before a scenario or a repeated measurement, wait up to this long for other processes to "
        "leave the CPUs idle (the whole run spends at most 120 s, 15 s with --quick, waiting and repeating)",
    )
    args = parser.parse_args(argv)

    os.environ.setdefault(SECRET_ENV, secrets.token_urlsafe(32))
    generator = find_generator(args.generator)
    settings = Settings.make(args, generator)
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    if settings.pin:
        pin(os.getpid(), GEN_CORE)
    chosen = args.only or list(SCENARIOS)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "meta": {
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "quick": settings.quick,
            "generator": generator,
            "pinned": settings.pin,
            "cores": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "versions": _versions(),
            "git": _git_state(),
            "proxy_log_level": settings.proxy_log_level,
            "warmup_seconds": settings.warmup,
            "duration_seconds": settings.duration,
        },
        "scenarios": {},
    }
    rows: list[Row] = []
    failures = 0
    for name in chosen:
        print(f"== {name}: {SCENARIOS[name].__doc__}", flush=True)
        waiting = time.perf_counter()
        background = wait_for_quiet(min(args.wait_quiet, max(settings.retry_budget, 0.0)))
        settings.retry_budget -= max(0.0, time.perf_counter() - waiting - 0.5)
        began = time.perf_counter()
        try:
            with harness(settings) as h:
                scenario_rows, measurements = SCENARIOS[name](h)
        except Exception as exc:  # one scenario failing must not lose the others' results
            failures += 1
            print(f"   FAILED: {type(exc).__name__}: {exc}", flush=True)
            report["scenarios"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        rows.extend(scenario_rows)
        report["scenarios"][name] = {
            "seconds": round(time.perf_counter() - began, 1),
            "background_cpu_pct_before": round(background, 1),
            "rows": [row.as_dict() for row in scenario_rows],
            "measurements": measurements,
        }
        print(render_table(scenario_rows), flush=True)
        for key in ("profile", "profile_c1"):
            if key in measurements:
                print_profile(measurements[key])
    report["rows"] = [row.as_dict() for row in rows]
    report["summary"] = dict(Counter(row.status for row in rows))
    report["meta"]["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\n== results ({generator}, {'pinned' if settings.pin else 'not pinned'}, "
          f"{report['meta']['seconds']} s)")  # fmt: skip
    print(render_table(rows))
    noisy = noisy_measurements(report)
    report["noisy_measurements"] = noisy
    if noisy:
        print(f"\n* other processes used more than {NOISE_LIMIT:.0f}% of a core during: " + ", ".join(noisy))
    print(f"\nwrote {args.json}; " + ", ".join(f"{k}: {v}" for k, v in sorted(report["summary"].items())))
    return 1 if failures else 0


def wait_for_quiet(patience: float, threshold: float = 15.0) -> float:
    """The machine's background CPU (percent of one core), after waiting up to `patience` s for quiet."""
    deadline = time.monotonic() + patience
    while True:
        background = background_cpu_pct(0.5)
        if background <= threshold or time.monotonic() >= deadline:
            break
    note = " (other processes are using the CPUs: figures will be noisy)" if background > threshold else ""
    print(f"   background CPU before start: {background:.0f}% of one core{note}", flush=True)
    return background


def noisy_measurements(report: dict[str, Any], threshold: float = NOISE_LIMIT) -> list[str]:
    """Measurements during which something else used more than `threshold` % of a core."""
    found: list[str] = []

    def visit(path: str, value: Any) -> None:
        if isinstance(value, dict):
            if value.get("other_cpu_pct", 0) > threshold:
                found.append(f"{path} ({value['other_cpu_pct']:.0f}%)")
            for key, child in value.items():
                visit(f"{path}.{key}", child)

    for scenario, data in report["scenarios"].items():
        visit(scenario, data.get("measurements") or {})
    return found


def print_profile(profile: dict[str, Any]) -> None:
    if "error" in profile:
        print(f"   profile: {profile['error']}")
        return
    load = profile["load"]
    print(
        f"\n   py-spy profile ({profile['samples']} samples at c={load['concurrency']}, "
        f"{load['rps']:.0f} req/s while sampled) -> {profile['folded']}"
    )
    for title, key in (
        ("proxy code, inclusive", "proxy_inclusive_top"),
        ("proxy code, self", "proxy_self_top"),
        ("all code, self", "self_top"),
        ("by package (self)", "by_package"),
    ):
        print(f"   {title}:")
        for item in profile[key][:12]:
            print(f"     {item['pct']:5.1f}%  {item['function']}")


if __name__ == "__main__":
    sys.exit(main())
