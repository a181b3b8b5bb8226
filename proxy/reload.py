"""Hot reload: on SIGHUP, or when the config or a policy file changes.

The new config is validated completely (keys, secrets, every policy) before anything changes; an
invalid one leaves the old config serving and logs one line saying why. A valid one replaces the
runtime whole: new requests use it, requests in flight finish on the one they started with.
Removed tenants are refused at once and lose their cache entries, sessions and limits; a tenant
whose upstream or policy changed loses its cache entries (and, for a new upstream, its sessions);
upstreams no tenant uses any more are closed after the shutdown grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import structlog
from aiohttp import web

from proxy.config import ConfigError, ProxyConfig, load_config
from proxy.runtime import Runtime
from proxy.transport import RUNTIME, SERVICES, end_upstream_session
from proxy.upstream import Upstream

log = structlog.get_logger("proxy.reload")

# What a running listener cannot change: these need a restart.
_FIXED_LISTEN_KEYS = ("host", "port", "path", "public_url")


def _check_fixed(old: ProxyConfig, new: ProxyConfig) -> None:
    for key in _FIXED_LISTEN_KEYS:
        if getattr(old.listen, key) != getattr(new.listen, key):
            raise ConfigError(new.source, f"listen.{key}", "cannot change while running; restart the proxy")


async def reload_config(app: web.Application) -> bool:
    """Load the config file again and, if it is valid, switch to it. True when switched."""
    ref, services = app[RUNTIME], app[SERVICES]
    old = ref.current
    try:
        config = load_config(old.config.source)
        _check_fixed(old.config, config)
        new = Runtime.build(config, previous=old)
    except ConfigError as exc:
        services.metrics.reloads.labels("invalid").inc()
        log.error("reload_rejected", error=str(exc))
        return False
    ref.current = new
    services.sessions.idle_timeout_seconds = config.sessions.idle_timeout_seconds
    services.sessions.max_per_tenant = config.sessions.max_per_tenant
    for tenant_id, before in old.tenants.items():
        after = new.tenants.get(tenant_id)
        upstream_changed = after is None or after.upstream is not before.upstream
        policy_changed = after is None or after.policy != before.policy
        if (upstream_changed or policy_changed) and services.cache is not None:
            services.cache.invalidate(tenant_id)
        if upstream_changed:
            for session in await services.sessions.of_tenant(tenant_id):
                await services.sessions.remove(session)
                await end_upstream_session(before.upstream, session)
        if after is None:
            services.limiter.forget(tenant_id)
            services.audit.forget([tenant_id])
    stale = old.upstreams_not_in(new)
    if stale:
        grace = config.listen.shutdown_grace_seconds
        task = asyncio.create_task(_close_later(stale, grace), name="close-replaced-upstreams")
        app[RETIRED].add(task)
        task.add_done_callback(app[RETIRED].discard)
    services.metrics.reloads.labels("ok").inc()
    log.info("reloaded", tenants=len(new.tenants), replaced_upstreams=len(stale))
    return True


async def _close_later(upstreams: list[Upstream], grace: float) -> None:
    """Let requests in flight on replaced upstreams finish, then close them."""
    await asyncio.sleep(grace)
    for upstream in upstreams:
        with contextlib.suppress(Exception):
            await upstream.close()


RETIRED = web.AppKey("retired_upstream_closers", set[asyncio.Task[None]])


def _mtimes(files: list[Path]) -> dict[Path, float | None]:
    stamps: dict[Path, float | None] = {}
    for file in files:
        try:
            stamps[file] = file.stat().st_mtime
        except OSError:
            stamps[file] = None
    return stamps


async def watch_files(app: web.Application, poll_seconds: float) -> None:
    """Reload when the config file or a policy it names changes (checked every `poll_seconds`)."""
    seen = _mtimes(app[RUNTIME].current.config.watched_files)
    while True:
        await asyncio.sleep(poll_seconds)
        now = _mtimes(app[RUNTIME].current.config.watched_files)
        if now != seen:
            await reload_config(app)
            seen = _mtimes(app[RUNTIME].current.config.watched_files)
