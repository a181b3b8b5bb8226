"""How the process and what it holds are doing, for /metrics, at no cost to requests.

    mcp_proxy_event_loop_lag_seconds               histogram: how late the loop ran a timer due
                                                   every LAG_INTERVAL_SECONDS (a blocking call or
                                                   a CPU-bound burst delays every request as much)
    mcp_proxy_upstream_connections{tenant,state}   a tenant's HTTP upstream pool: in_use, idle
    mcp_proxy_open_streams{tenant,kind}            long-lived streams open on this replica: get (a
                                                   session's GET stream), listen (subscriptions/listen)
    mcp_proxy_unattributed_notifications_dropped_total{tenant}
                                                   counter: messages of a tenant's shared stdio process
                                                   that named no request and could not be attributed
                                                   to one user's request (dropped, never guessed)

The gauges are read from live state when /metrics is scraped; the lag timer is the only thing that
runs meanwhile (a few times a second, nothing per request). Labels are configured tenant ids and
fixed words. The process's own figures (process_*, python_*) are prometheus_client's collectors,
registered with the other metrics (ops/metrics.py).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Final

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from proxy.http.keys import RUNTIME, SERVICES
from proxy.ops.metrics import Metrics
from proxy.upstreams.http import HttpUpstream
from proxy.upstreams.stdio.upstream import StdioUpstream

LAG_INTERVAL_SECONDS: Final = 1.0
STREAM_KINDS: Final = ("get", "listen")


class LoopLag:
    """A timer that notes how late it runs, again and again, until stopped."""

    def __init__(self, metrics: Metrics, interval: float = LAG_INTERVAL_SECONDS) -> None:
        self._metrics = metrics
        self._interval = interval
        self._due = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._schedule(asyncio.get_running_loop())

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._due = loop.time() + self._interval
        # An empty context: the timer belongs to no request (and keeps none of their log context).
        self._timer = loop.call_at(self._due, self._tick, loop, context=contextvars.Context())

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._metrics.loop_lag.observe(max(0.0, loop.time() - self._due))
        self._schedule(loop)


async def watch_loop_lag(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the lag timer runs while the application does."""
    lag = LoopLag(app[SERVICES].metrics)
    lag.start()
    yield
    lag.stop()


def resource_gauges(app: web.Application) -> Callable[[], Iterable[Metric]]:
    def collect() -> Iterable[Metric]:
        services, runtime = app[SERVICES], app[RUNTIME].current
        connections = GaugeMetricFamily(
            "mcp_proxy_upstream_connections",
            "Connections of a tenant's HTTP upstream pool, in use or idle (kept alive)",
            labels=["tenant", "state"],
        )
        streams = GaugeMetricFamily(
            "mcp_proxy_open_streams",
            "Long-lived streams open on this replica: get (a session's GET stream) or listen "
            "(subscriptions/listen)",
            labels=["tenant", "kind"],
        )
        unattributed = CounterMetricFamily(
            "mcp_proxy_unattributed_notifications_dropped",
            "Messages of a tenant's shared stdio process that named no request and could not be "
            "attributed to one user's request: dropped",
            labels=["tenant"],
        )
        open_streams = services.metrics.open_streams
        for tenant in runtime.tenants:  # (template tenants: those active)
            tenant_id, upstream = tenant.id, tenant.upstream
            if isinstance(upstream, HttpUpstream):
                connections.add_metric([tenant_id, "in_use"], upstream.connections_in_use)
                connections.add_metric([tenant_id, "idle"], upstream.connections_idle)
            elif isinstance(upstream, StdioUpstream):
                unattributed.add_metric([tenant_id], upstream.unattributed_dropped)
            for kind in STREAM_KINDS:
                streams.add_metric([tenant_id, kind], open_streams.get((tenant_id, kind), 0))
        yield connections
        yield streams
        yield unattributed

    return collect
