"""GET /metrics, on a listener of its own: metrics name every tenant and its activity. The admin
endpoints (ops/admin.py) are on that listener too, behind the same token.

By default they are served on `metrics.listen` (127.0.0.1:9464) and nowhere else: the public
listener, where tenants' clients connect, answers /metrics with 404 unless `metrics.public` says
otherwise. `metrics.bearer_token_env` guards either listener. The metrics listener shares the
main application's state (runtime and services), is started with it and stopped with it.
"""

from __future__ import annotations

import hmac

import structlog
from aiohttp import web

from proxy.config import ConfigError, MetricsConfig
from proxy.http.keys import METRICS_LISTENER, RUNTIME, SERVICES
from proxy.ops.metrics import CONTENT_TYPE_LATEST
from proxy.protocol.jsonrpc import dumps, error_body

log = structlog.get_logger("proxy.metrics")


def bearer_refusal(request: web.Request, needs: str) -> web.Response | None:
    """401 unless the request carries the metrics token (None: it does, or none is configured)."""
    token = request.app[RUNTIME].current.metrics_token
    if token is None:
        return None
    sent = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    if hmac.compare_digest(sent, b"Bearer " + token):
        return None
    return web.Response(
        status=401,
        body=dumps(error_body(None, -32001, f"Unauthorized: {needs}")),
        content_type="application/json",
        headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
    )


async def metrics(request: web.Request) -> web.Response:
    refused = bearer_refusal(request, "/metrics needs its bearer token")
    if refused is not None:
        return refused
    services = request.app[SERVICES]
    services.reports.run_now()  # the exchanges answered so far count
    body = services.metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class MetricsListener:
    """The metrics listener of one application (none when `metrics.listen` is null)."""

    def __init__(self, config: MetricsConfig, source: str) -> None:
        self.config = config.listen
        self.source = source  # the config file, for the one-line error when the port is taken
        self.port: int | None = None  # the bound port, once started
        self._runner: web.AppRunner | None = None

    async def start(self, main: web.Application) -> None:
        if self.config is None:
            return
        from proxy.ops import admin

        app = web.Application(middlewares=[admin.guard])
        app[RUNTIME], app[SERVICES] = main[RUNTIME], main[SERVICES]
        app.router.add_get("/metrics", metrics)
        admin.add_routes(app)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            where = f"{self.config.host}:{self.config.port}"
            raise ConfigError(
                self.source, "metrics.listen", f"cannot listen on {where}: {exc.strerror}"
            ) from None
        sockets = getattr(site._server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.config.port
        log.info("metrics_listening", host=self.config.host, port=self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def add_public_route(app: web.Application, config: MetricsConfig) -> None:
    """/metrics on the public listener only when configured so; otherwise it is not there (404)."""
    if config.public:
        app.router.add_get("/metrics", metrics)


async def stop_listener(app: web.Application) -> None:
    await app[METRICS_LISTENER].stop()
