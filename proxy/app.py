"""create_app(config): the aiohttp application, its typed state, routes and background tasks."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from urllib.parse import urlsplit

import structlog
from aiohttp import web
from prometheus_client.core import GaugeMetricFamily

from proxy.config import ProxyConfig
from proxy.http.edge import edge, stamp_request_id
from proxy.http.endpoint import mcp_handler
from proxy.http.keys import METRICS_LISTENER, READINESS, RELOADS, RETIRED, RUNTIME, SERVICES
from proxy.layers.sessions.stage import end_upstream_session
from proxy.ops.drain import close_upstreams, end_own_sessions
from proxy.ops.health import Readiness, healthz, keep_checking, readyz
from proxy.ops.metrics_endpoint import MetricsListener, add_public_route, stop_listener
from proxy.ops.reload import ReloadState, stamps, watch_files
from proxy.ops.runtime_metrics import resource_gauges, watch_loop_lag
from proxy.runtime import Runtime, RuntimeRef, Services

log = structlog.get_logger("proxy.app")


async def protected_resource_metadata(request: web.Request) -> web.Response:
    return web.json_response(request.app[RUNTIME].current.authenticator.metadata)


def _gauges(app: web.Application) -> Callable[[], Iterable[GaugeMetricFamily]]:
    def collect() -> Iterable[GaugeMetricFamily]:
        services, runtime = app[SERVICES], app[RUNTIME].current
        sessions = GaugeMetricFamily("mcp_proxy_sessions", "Open handshake-era sessions", labels=["tenant"])
        circuit = GaugeMetricFamily("mcp_proxy_circuit_open", "1 while a tenant's upstream circuit is open",
                                    labels=["tenant"])  # fmt: skip
        for tenant in dict.fromkeys(t.id for t in runtime.tenants):  # explicit and active template tenants
            sessions.add_metric([tenant], services.sessions.count(tenant))
            circuit.add_metric([tenant], 1.0 if services.limiter.circuit_open(tenant) else 0.0)
        yield sessions
        yield circuit
        yield GaugeMetricFamily("mcp_proxy_tenants", "Tenants with a runtime here: every configured one, and "
                                "the active ones a template serves", value=len(runtime.tenants))  # fmt: skip
        # Live objects, as the allocator counts them: unlike RSS (which keeps what CPython's
        # allocator holds on to), this falls back when tenants go idle.
        yield GaugeMetricFamily("mcp_proxy_heap_blocks", "Memory blocks Python objects hold now",
                                value=sys.getallocatedblocks())  # fmt: skip
        if services.shared is not None:
            yield GaugeMetricFamily("mcp_proxy_state_up", "1 while the shared state store (Redis) answers",
                                    value=1.0 if services.shared.up else 0.0)  # fmt: skip
        cache = services.cache
        yield GaugeMetricFamily("mcp_proxy_cache_bytes", "Bytes held by the response cache",
                                value=cache.size_bytes if cache is not None else 0)  # fmt: skip
        yield GaugeMetricFamily("mcp_proxy_cache_entries", "Entries in the response cache",
                                value=len(cache) if cache is not None else 0)  # fmt: skip

    return collect


async def _sweep(app: web.Application) -> None:
    """Expire idle sessions (ending them upstream too), drop idle template tenants and let
    upstreams tidy up (idle processes)."""
    services = app[SERVICES]
    while True:
        runtime = app[RUNTIME].current
        await asyncio.sleep(_sweep_seconds(runtime, services))
        runtime = app[RUNTIME].current
        for session in await services.sessions.expired():
            await services.sessions.remove(session)
            tenant = runtime.tenants.of_tenant(session.tenant)
            if tenant is not None:
                await end_upstream_session(tenant.upstream, session)
            log.info("session_expired", tenant=session.tenant, session=session.audit_id)
        await drop_idle_tenants(runtime, services, time.monotonic())
        for tenant in runtime.tenants:
            await tenant.upstream.sweep()


def _idle_stops(runtime: Runtime) -> list[float]:
    """How long stdio processes may idle: the sweep comes round often enough to stop them in time."""
    return [t.config.upstream.idle_stop_seconds for t in runtime.tenants if t.config.upstream.command]


def _sweep_seconds(runtime: Runtime, services: Services) -> float:
    """Often enough for the shortest idle timeout (sessions, template tenants, stdio processes): a
    quarter of it."""
    shortest = min(
        [
            services.sessions.idle_timeout_seconds,
            *(t.idle_seconds for t in runtime.config.tenant_templates),
            *_idle_stops(runtime),
        ]
    )
    return max(0.5, min(30.0, shortest / 4))


async def drop_idle_tenants(runtime: Runtime, services: Services, now: float) -> None:
    """Template tenants unused for their idle_seconds leave memory: upstream closed, catalog gone,
    and what the proxy keeps per tenant id (limits, recent audit records, metrics series, verified
    tokens) forgotten unless another runtime of the id remains."""
    dropped = runtime.tenants.drop_idle(now, lambda tenant: services.sessions.count(tenant) > 0)
    for tenant in dropped:
        with contextlib.suppress(Exception):
            await tenant.bridge.close()
            await tenant.upstream.close()
    gone = {t.id for t in dropped if runtime.tenants.of_tenant(t.id) is None}
    if gone:
        services.forget_tenants(gone)
        runtime.authenticator.forget_tenants(gone)
        log.debug("tenants_idle_dropped", count=len(gone))


async def _background(app: web.Application) -> AsyncIterator[None]:
    config = app[RUNTIME].current.config
    await app[SERVICES].connect()
    tasks = [
        asyncio.create_task(_sweep(app), name="session-sweeper"),
        asyncio.create_task(keep_checking(app), name="readiness"),
    ]
    if config.reload.watch_files:
        tasks.append(asyncio.create_task(watch_files(app, config.reload.poll_seconds), name="reload-watch"))
    yield
    for task in [*tasks, *app[RETIRED]]:
        task.cancel()
    for task in [*tasks, *app[RETIRED]]:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    services, runtime = app[SERVICES], app[RUNTIME].current
    await end_own_sessions(services, runtime)  # (within a stop's time bound: ops/drain.py)
    await close_upstreams(services, runtime)
    await services.close()


async def _begin_shutdown(app: web.Application) -> None:
    """Stop accepting is done by the runner; here open GET streams are told to end cleanly."""
    app[SERVICES].shutting_down.set()


def create_app(config: ProxyConfig, runtime: Runtime | None = None) -> web.Application:
    app = web.Application(
        middlewares=[edge],
        client_max_size=config.listen.max_body_bytes,
        handler_args={
            "max_field_size": config.listen.max_header_bytes,
            "max_line_size": config.listen.max_header_bytes,
            "keepalive_timeout": config.listen.idle_timeout_seconds,
            # After refusing a body (413, 408), read what is in flight for at most this long so
            # the client sees the answer, then close: a slow client cannot hold the connection.
            "lingering_time": 2.0,
        },
    )
    app[RELOADS] = ReloadState(stamps(config.watched_files))
    services = Services.build(config)
    app[RUNTIME] = RuntimeRef(runtime or Runtime.build(config, shared=services.shared))
    app[SERVICES] = services
    app[READINESS] = Readiness()
    app[RETIRED] = set()
    app[METRICS_LISTENER] = MetricsListener(config.metrics, config.source)
    services.metrics.add_gauges(_gauges(app))
    services.metrics.add_gauges(resource_gauges(app))
    path = config.listen.path
    app.router.add_route("*", path, mcp_handler(services.tracing))
    # RFC 9728 metadata: the root form and the path-inserted form of the MCP path, as listened on
    # and as public_url names it (the challenge's resource_metadata), with and without a slash.
    public_path = urlsplit(config.listen.resource_url).path
    inserted = {
        p for p in (path, path.rstrip("/"), public_path, public_path.rstrip("/")) if p not in ("", "/")
    }
    for suffix in ["", *sorted(inserted)]:
        app.router.add_get(f"/.well-known/oauth-protected-resource{suffix}", protected_resource_metadata)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    add_public_route(app, config.metrics)
    app.on_response_prepare.append(stamp_request_id)
    app.on_shutdown.append(_begin_shutdown)
    app.on_cleanup.append(stop_listener)
    app.cleanup_ctx.append(_background)
    app.cleanup_ctx.append(watch_loop_lag)
    return app
