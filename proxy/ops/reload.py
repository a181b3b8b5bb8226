"""Hot reload: on SIGHUP, or when the config or a policy file changes.

The new config is validated completely (keys, secrets, every policy) before anything changes; an
invalid one leaves the old config serving and logs one line saying why. A valid one replaces the
runtime whole: new requests use it, requests in flight finish on the one they started with.
Removed tenants are refused at once and lose their cache entries, sessions and limits; a tenant
whose upstream or policy changed loses its cache entries (and, for a new upstream, its sessions);
upstreams no tenant uses any more are closed after the shutdown grace period. Template tenants
active at the reload are carried over when their template still serves them with the same upstream;
the others are treated as removed (a later request builds them from the new config). The
tenant allowlist file is read again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Final

import structlog
from aiohttp import web

from proxy.config import ConfigError, ProxyConfig, load_config
from proxy.http.keys import RETIRED, RUNTIME, SERVICES
from proxy.layers.sessions.registry import Session
from proxy.layers.sessions.stage import end_upstream_session
from proxy.runtime import Runtime
from proxy.upstreams.base import Upstream

log = structlog.get_logger("proxy.ops.reload")

END_SESSION_SECONDS: Final = 5.0  # how long a replaced upstream gets to end one session

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
        new = Runtime.build(config, previous=old, shared=services.shared)
    except ConfigError as exc:
        services.metrics.reloads.labels("invalid").inc()
        log.error("reload_rejected", error=str(exc))
        return False
    ref.current = new
    services.sessions.idle_timeout_seconds = config.sessions.idle_timeout_seconds
    services.sessions.max_per_tenant = config.sessions.max_per_tenant
    services.reports.run_now()  # reports of the old config's last answers first: then forget
    moved: list[tuple[str, Upstream]] = []  # tenants whose sessions end: removed or on a new upstream
    gone: set[str] = set()
    for before in old.tenants:  # first what needs no I/O, for every tenant with a runtime
        tenant_id = before.id
        after = new.tenants.built(before.key)
        upstream_changed = after is None or after.upstream is not before.upstream
        policy_changed = after is None or after.policy != before.policy
        if (upstream_changed or policy_changed) and services.cache is not None:
            services.cache.invalidate(tenant_id)  # (entries of the old config are unreachable anyway)
        if upstream_changed:
            moved.append((tenant_id, before.upstream))
        if new.tenants.of_tenant(tenant_id) is None:  # removed, or a template tenant built anew if used
            gone.add(tenant_id)
    services.forget_tenants(gone)
    ended: list[tuple[Upstream, Session]] = []
    for tenant_id, upstream in moved:  # their sessions are gone for clients at once ...
        for session in await services.sessions.of_tenant(tenant_id):
            await services.sessions.remove(session)
            ended.append((upstream, session))
    if ended:  # ... and end upstream in the background: a hung old upstream delays nothing
        _retire(app, _end_upstream_sessions(ended), "end-replaced-sessions")
    stale = old.upstreams_not_in(new)
    _retire(app, _close_later(app, old, config.listen.shutdown_grace_seconds), "close-replaced-upstreams")
    services.metrics.reloads.labels("ok").inc()
    log.info("reloaded", tenants=len(new.tenants), replaced_upstreams=len(stale))
    return True


def _retire(app: web.Application, work: Coroutine[Any, Any, None], name: str) -> None:
    task = asyncio.create_task(work, name=name)
    app[RETIRED].add(task)
    task.add_done_callback(app[RETIRED].discard)


async def _end_upstream_sessions(ended: list[tuple[Upstream, Session]]) -> None:
    """DELETE the upstream side of sessions a reload ended, all at once, each for a bounded time."""

    async def end(upstream: Upstream, session: Session) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(end_upstream_session(upstream, session), END_SESSION_SECONDS)

    await asyncio.gather(*(end(upstream, session) for upstream, session in ended))


async def _close_later(app: web.Application, old: Runtime, grace: float) -> None:
    """Let requests in flight on the replaced runtime finish, then close its upstreams that the
    current runtime does not use. Worked out now, not at the reload: a request that was being
    authenticated as the reload happened may have built a template tenant in the old runtime."""
    await asyncio.sleep(grace)
    for upstream in old.upstreams_not_in(app[RUNTIME].current):
        with contextlib.suppress(Exception):
            await upstream.close()


def _mtimes(files: list[Path]) -> dict[Path, float | None]:
    stamps: dict[Path, float | None] = {}
    for file in files:
        try:
            stamps[file] = file.stat().st_mtime
        except OSError:
            stamps[file] = None
    return stamps


async def watch_files(app: web.Application, poll_seconds: float) -> None:
    """Reload when the config file or a policy it names changes (checked every `poll_seconds`).
    The list of files is worked out once per config: with many tenants it is the costly part."""
    config = app[RUNTIME].current.config
    files = config.watched_files
    seen = _mtimes(files)
    while True:
        await asyncio.sleep(poll_seconds)
        if app[RUNTIME].current.config is not config:
            # Reloaded meanwhile (SIGHUP): watch the new config's files, still compared with what
            # was seen before, so an edit made just after that reload read them is not missed.
            config = app[RUNTIME].current.config
            files = config.watched_files
        now = _mtimes(files)
        if now != seen:
            await reload_config(app)
            config = app[RUNTIME].current.config
            files = config.watched_files
            seen = _mtimes(files)
