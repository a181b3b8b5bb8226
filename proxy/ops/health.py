"""/healthz (the process serves) and /readyz (config loaded, listener up, upstreams reachable as
`readiness.upstreams` asks: those of configured tenants and of active template tenants; not while
stopping). Neither needs a token and neither names a tenant: counts only.

An HTTP upstream counts as reachable when a TCP connection to it opens; a stdio upstream when its
program starts and completes the MCP handshake (tried once with a child of its own, until a child
has answered; a child that then fails to start makes it unreachable again). With `readiness.
upstreams: ignore` no child is started for this: a stdio upstream counts unless one failed. An upstream that
becomes unreachable is logged once, with its URL (credentials removed) or program and the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from proxy.http.keys import READINESS, RUNTIME, SERVICES
from proxy.runtime import Runtime
from proxy.tenants.directory import TenantRuntime
from proxy.upstreams.http import failure_reason, redacted_url
from proxy.upstreams.stdio.upstream import StdioUpstream

log = structlog.get_logger("proxy.ops.health")

CONNECT_TIMEOUT_SECONDS = 2.0
PROBES_AT_ONCE = 4  # stdio programs started at once to check them


async def http_problem(url: str) -> str | None:
    """None when a TCP connection to the URL's host and port opens, else why not."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, port), CONNECT_TIMEOUT_SECONDS
        )
    except TimeoutError:
        return f"no connection within {CONNECT_TIMEOUT_SECONDS:g} s"
    except OSError as exc:
        return failure_reason(exc)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


class Readiness:
    """Upstream reachability, checked in the background so a probe never waits on the network."""

    def __init__(self) -> None:
        self.reachable = 0
        self.total = 0
        self.checked_at: float | None = None
        self._problems: dict[str, str] = {}  # target -> the problem last logged for it
        self._probes = asyncio.Semaphore(PROBES_AT_ONCE)

    async def check(self, runtime: Runtime) -> None:
        targets: dict[str, list[TenantRuntime]] = {}  # one check per distinct target
        for tenant in runtime.tenants:  # template tenants: those active (an idle one has no target yet)
            upstream = tenant.config.upstream
            # An HTTP URL is one target however many tenants share it; each stdio upstream is its own.
            target = upstream.url if upstream.url is not None else f"stdio:{tenant.id}"
            targets.setdefault(target, []).append(tenant)
        start_children = runtime.config.readiness.upstreams != "ignore"
        problems = await asyncio.gather(
            *(self._problem(tenants[0], start_children) for tenants in targets.values())
        )
        self.total = len(runtime.tenants)
        self.reachable = sum(
            len(tenants)
            for problem, tenants in zip(problems, targets.values(), strict=True)
            if problem is None
        )
        for (target, tenants), problem in zip(targets.items(), problems, strict=True):
            self._report(target, tenants[0], problem)
        self.checked_at = time.monotonic()

    async def _problem(self, tenant: TenantRuntime, start_children: bool) -> str | None:
        upstream = tenant.upstream
        if isinstance(upstream, StdioUpstream):
            if upstream.proven or not start_children:  # (ignore: no process started just to count)
                return upstream.start_problem
            async with self._probes:
                return await upstream.probe()
        url = tenant.config.upstream.url
        assert url is not None
        return await http_problem(url)

    def _report(self, target: str, tenant: TenantRuntime, problem: str | None) -> None:
        """Log a change of a target's reachability, not every check's result."""
        before = self._problems.get(target)
        if problem == before:
            return
        upstream = tenant.config.upstream
        where = (
            {"url": redacted_url(upstream.url)}
            if upstream.url is not None
            else {"program": (upstream.command or ("",))[0], "tenant": tenant.id}
        )
        if problem is None:
            self._problems.pop(target, None)
            log.info("upstream_reachable", **where)
        else:
            self._problems[target] = problem
            log.warning("upstream_unreachable", reason=problem, **where)

    def ready(self, mode: str) -> bool:
        if mode == "ignore":
            return True
        if self.checked_at is None:
            return False
        if mode == "all":
            return self.reachable == self.total
        return self.reachable > 0 or self.total == 0  # only templates, none active yet: nothing to wait for


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME].current
    readiness = request.app[READINESS]
    mode = runtime.config.readiness.upstreams
    shared = request.app[SERVICES].shared
    problem = shared.problem if shared is not None else None
    draining = request.app[SERVICES].drain.draining
    ready = readiness.ready(mode) and problem is None and not draining
    body: dict[str, object] = {
        "status": "ready" if ready else "not_ready",
        **({"reason": "draining"} if draining else {}),  # stopping: still serving, not for long
        "upstreams": {"reachable": readiness.reachable, "total": readiness.total, "required": mode},
        "checked": readiness.checked_at is not None,
    }
    if shared is not None:  # an outage is reported, not required: what needs no shared state is served
        state: dict[str, object] = {"backend": "redis", "up": shared.up}
        if problem is not None:  # never reached, or the credentials are refused: not ready
            state["problem"] = problem
        body["state"] = state
    return web.json_response(body, status=200 if ready else 503)


async def keep_checking(app: web.Application) -> None:
    readiness = app[READINESS]
    while True:
        runtime = app[RUNTIME].current
        await asyncio.gather(readiness.check(runtime), app[SERVICES].connect())
        await asyncio.sleep(runtime.config.readiness.check_interval_seconds)
