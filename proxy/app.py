"""create_app(config): the aiohttp application, its typed state, routes and background tasks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from aiohttp import web

from proxy.config import ProxyConfig
from proxy.errors import ProxyError
from proxy.jsonrpc import dumps, error_body
from proxy.metrics import CONTENT_TYPE_LATEST
from proxy.runtime import Runtime, Services
from proxy.transport import RUNTIME, SERVICES, end_upstream_session, handle_mcp

log = structlog.get_logger("proxy.app")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Whatever goes wrong, the client gets a JSON-RPC error body, never a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        body = error_body(None, -32600, exc.reason)
        return web.Response(status=exc.status, body=dumps(body), content_type="application/json")
    except ProxyError as exc:
        return web.Response(
            status=exc.status,
            body=dumps(exc.to_jsonrpc(None)),
            content_type="application/json",
            headers=exc.headers,
        )
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled_error", path=request.path)
        body = error_body(None, -32603, "Internal proxy error")
        return web.Response(status=500, body=dumps(body), content_type="application/json")


async def protected_resource_metadata(request: web.Request) -> web.Response:
    return web.json_response(request.app[RUNTIME].authenticator.metadata)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[SERVICES].metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _expire_sessions(app: web.Application) -> None:
    services = app[SERVICES]
    interval = max(0.5, min(30.0, services.sessions.idle_timeout_seconds / 4))
    while True:
        await asyncio.sleep(interval)
        for session in services.sessions.expired():
            services.sessions.remove(session)
            await end_upstream_session(app[RUNTIME], session, session.tenant)
            log.info("session_expired", tenant=session.tenant, session=session.audit_id)
        for tenant in app[RUNTIME].tenants.values():
            await tenant.upstream.sweep()


async def _background(app: web.Application) -> AsyncIterator[None]:
    sweeper = asyncio.create_task(_expire_sessions(app))
    yield
    sweeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sweeper
    services, runtime = app[SERVICES], app[RUNTIME]
    for session in services.sessions.all():
        services.sessions.remove(session)
        await end_upstream_session(runtime, session, session.tenant)
    await runtime.close()
    services.audit.close()


def create_app(config: ProxyConfig, runtime: Runtime | None = None) -> web.Application:
    app = web.Application(
        middlewares=[json_errors],
        client_max_size=config.listen.max_body_bytes,
        handler_args={
            "max_field_size": config.listen.max_header_bytes,
            "max_line_size": config.listen.max_header_bytes,
        },
    )
    app[RUNTIME] = runtime or Runtime.build(config)
    app[SERVICES] = Services.build(config)
    path = config.listen.path
    app.router.add_route("*", path, handle_mcp)
    app.router.add_get("/.well-known/oauth-protected-resource", protected_resource_metadata)
    if path != "/":
        app.router.add_get(
            f"/.well-known/oauth-protected-resource{path.rstrip('/')}", protected_resource_metadata
        )
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.cleanup_ctx.append(_background)
    return app
