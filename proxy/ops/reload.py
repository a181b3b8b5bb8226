"""Hot reload: on SIGHUP, or when the config, a policy or a key file changes.

One edit is one reload: the file watch and SIGHUP both compare the files with what the last reload
(or the start) read, under one lock, so whichever comes second finds nothing new and does nothing.

The new config is validated completely (keys, secrets, every policy) before anything changes; an
invalid one leaves the old config serving and logs one line saying why. A valid one replaces the
runtime whole: new requests use it, requests in flight finish on the one they started with.
Removed tenants are refused at once, their open streams (GET, POST SSE, subscriptions/listen) end
at once, and they lose their cache entries, sessions and limits; a tenant
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog
from aiohttp import web

from proxy.config import ConfigError, ProxyConfig, load_config
from proxy.http.keys import RELOADS, RETIRED, RUNTIME, SERVICES
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
    if old.tracing != new.tracing:  # the flows were built with (or without) tracing at start-up
        raise ConfigError(new.source, "tracing", "cannot change while running; restart the proxy")


Stamp = tuple[int, int, int] | None  # modified (ns), size, inode; None: missing
Stamps = dict[Path, Stamp]


def stamps(files: list[Path]) -> Stamps:
    """How each file is now, to tell an edit from no edit (a replaced file changes its inode)."""
    found: Stamps = {}
    for file in files:
        try:
            stat = file.stat()
        except OSError:
            found[file] = None
        else:
            found[file] = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    return found


@dataclass(eq=False)
class ReloadState:
    """What the running config was read from, as it was then; reloads take turns."""

    read: Stamps
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


async def reload_config(app: web.Application, only_if_changed: bool = False) -> bool:
    """Load the config file again and, if it is valid, switch to it. True when switched.

    `only_if_changed` (SIGHUP, the file watch): nothing happens when no file the config reads has
    changed since the last reload read it, so one edit noticed by both reloads once."""
    state = app[RELOADS]
    async with state.lock:
        before = stamps(app[RUNTIME].current.config.watched_files)
        if only_if_changed and before == state.read:
            log.info("reload_skipped", reason="no file changed since the last reload read them")
            return False
        switched = await _reload(app)
        if not switched:
            state.read = before  # that edit was judged: the next reload waits for another
            return False
        after = stamps(app[RUNTIME].current.config.watched_files)
        # As seen before reading: a file edited while it was being read still differs, and is read
        # again. Files only the new config names are as they are now.
        state.read = {file: before.get(file, stamp) for file, stamp in after.items()}
        return True


async def _reload(app: web.Application) -> bool:
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
    old.retire_bridges()  # upstream sessions held for 2026-07-28 callers are the old config's
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
            services.cache.retire(tenant_id)  # stores of calls begun before the reload: not kept
        if upstream_changed:
            moved.append((tenant_id, before.upstream))
        if new.tenants.of_tenant(tenant_id) is None:  # removed, or a template tenant built anew if used
            gone.add(tenant_id)
        elif upstream_changed:
            before.moved = True
        if upstream_changed:
            before.removed.set()  # its streams end now, before anything more of the old upstream
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


async def watch_files(app: web.Application, poll_seconds: float) -> None:
    """Reload when a file the config reads changes (checked every `poll_seconds`). The list of files
    is worked out once per config: with many tenants it is the costly part."""
    config = None
    files: list[Path] = []
    while True:
        await asyncio.sleep(poll_seconds)
        current = app[RUNTIME].current.config
        if current is not config:  # started, or reloaded meanwhile (SIGHUP): its files
            config, files = current, current.watched_files
        if stamps(files) != app[RELOADS].read:
            await reload_config(app, only_if_changed=True)
