"""The application's and requests' typed state (aiohttp AppKey / RequestKey), in one place."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from proxy.ops.health import Readiness
    from proxy.ops.metrics_endpoint import MetricsListener
    from proxy.ops.reload import ReloadState
    from proxy.runtime import RuntimeRef, Services

# The current config's runtime (a reload swaps it whole).
RUNTIME: web.AppKey[RuntimeRef] = web.AppKey("runtime")
# What outlives a config: sessions, cache, audit, limits, metrics.
SERVICES: web.AppKey[Services] = web.AppKey("services")
READINESS: web.AppKey[Readiness] = web.AppKey("readiness")
METRICS_LISTENER: web.AppKey[MetricsListener] = web.AppKey("metrics_listener")  # /metrics of its own
RELOADS: web.AppKey[ReloadState] = web.AppKey("reloads")  # what the running config was read from
RETIRED: web.AppKey[set[asyncio.Task[None]]] = web.AppKey("retired_upstream_closers")  # reload clean-ups
REQUEST_ID = web.RequestKey("request_id", str)  # the id on every log line of one HTTP request
# The client's X-Request-Id when well-formed, else None (set on every request: read without a miss).
CLIENT_REQUEST_ID: web.RequestKey[str | None] = web.RequestKey("client_request_id")
