"""/healthz (the process serves) and /readyz (config loaded, listener up, upstreams reachable as
`readiness.upstreams` asks: those of configured tenants and of active template tenants). Neither
needs a token and neither names a tenant: counts only."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from urllib.parse import urlsplit

from aiohttp import web

from proxy.http.keys import READINESS, RUNTIME, SERVICES
from proxy.runtime import Runtime

CONNECT_TIMEOUT_SECONDS = 2.0


async def _reachable_http(url: str) -> bool:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, port), CONNECT_TIMEOUT_SECONDS
        )
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class Readiness:
    """Upstream reachability, checked in the background so a probe never waits on the network."""

    def __init__(self) -> None:
        self.reachable = 0
        self.total = 0
        self.checked_at: float | None = None

    async def check(self, runtime: Runtime) -> None:
        targets: dict[str, list[str]] = {}  # one check per distinct target, however many tenants share it
        for tenant in runtime.tenants:  # template tenants: those active (an idle one has no target yet)
            upstream = tenant.config.upstream
            target = upstream.url if upstream.url is not None else f"stdio:{(upstream.command or ('',))[0]}"
            targets.setdefault(target, []).append(tenant.id)
        results = await asyncio.gather(*(self._probe(target) for target in targets))
        self.total = len(runtime.tenants)
        self.reachable = sum(
            len(tenants) for ok, tenants in zip(results, targets.values(), strict=True) if ok
        )
        self.checked_at = time.monotonic()

    @staticmethod
    async def _probe(target: str) -> bool:
        if target.startswith("stdio:"):
            program = target.removeprefix("stdio:")
            return bool(program) and ("/" in program or shutil.which(program) is not None)
        return await _reachable_http(target)

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
    ready = readiness.ready(mode)
    body: dict[str, object] = {
        "status": "ready" if ready else "not_ready",
        "upstreams": {"reachable": readiness.reachable, "total": readiness.total, "required": mode},
        "checked": readiness.checked_at is not None,
    }
    shared = request.app[SERVICES].shared
    if shared is not None:  # reported, not required: what needs no shared state is still served
        body["state"] = {"backend": "redis", "up": shared.up}
    return web.json_response(body, status=200 if ready else 503)


async def keep_checking(app: web.Application) -> None:
    readiness = app[READINESS]
    while True:
        runtime = app[RUNTIME].current
        await asyncio.gather(readiness.check(runtime), app[SERVICES].connect())
        await asyncio.sleep(runtime.config.readiness.check_interval_seconds)
