"""Admin endpoints, on the metrics listener only, behind its bearer token (`metrics.bearer_token_env`).

    GET    /admin/config                                   the running config: sha256 of each file
                                                           read (as `sha256sum` prints it), and when
    GET    /admin/tenants/{tenant}/sessions                a tenant's handshake-era sessions
    DELETE /admin/tenants/{tenant}/sessions/{id}           end one (upstream too, as a client's
    POST   /admin/tenants/{tenant}/sessions/{id}/end        DELETE does; either form)
    POST   /admin/tenants/{tenant}/cache/flush             drop the tenant's cached results

Without a configured token they are off: every /admin path answers 404, whoever asks (fail closed:
the listener may be reachable by more than the operators). With one, a missing or wrong token gets
401 before anything is looked up. A session is named by its hash (`Session.audit_id`, as audit
records and logs name it) and only under its own tenant: another tenant's hash is not found. No
answer ever holds a raw session id, a subject (hashed like the log lines' subject_hash), a token or
anything a client sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Final

import structlog
from aiohttp import web

from proxy.backends.redis.client import StateUnavailable
from proxy.http.keys import RUNTIME, SERVICES
from proxy.layers.sessions.registry import Session
from proxy.layers.sessions.stage import end_upstream_session
from proxy.ops.metrics_endpoint import bearer_refusal
from proxy.protocol.jsonrpc import error_body
from proxy.tenants.directory import TenantRuntime
from proxy.types import Era, JsonObject, principal_hash

log = structlog.get_logger("proxy.admin")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

END_SESSION_SECONDS: Final = 5.0  # how long the upstream gets to end a session
_SESSION_HASH = re.compile(r"[0-9a-f]{16}")
NO_STORE = {"Cache-Control": "no-store"}


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/config", running_config)
    app.router.add_get("/admin/tenants/{tenant}/sessions", list_sessions)
    app.router.add_delete("/admin/tenants/{tenant}/sessions/{session}", end_session)
    app.router.add_post("/admin/tenants/{tenant}/sessions/{session}/end", end_session)
    app.router.add_post("/admin/tenants/{tenant}/cache/flush", flush_cache)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Off without a token, 401 without the right one: before anything is looked up. Unknown paths
    and methods under /admin get JSON errors too."""
    if request.path != "/admin" and not request.path.startswith("/admin/"):
        return await handler(request)
    if request.app[RUNTIME].current.metrics_token is None:
        return refusal(404, "Not found: the admin endpoints are off until metrics.bearer_token_env is set")
    refused = bearer_refusal(request, "the admin endpoints need the metrics bearer token")
    if refused is not None:
        return refused
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return refusal(404, "Not found: no such admin endpoint")
    except web.HTTPMethodNotAllowed as exc:
        return refusal(405, f"Method not allowed: {', '.join(sorted(exc.allowed_methods))} only")


def refusal(status: int, message: str) -> web.Response:
    code = {401: -32001, 404: -32004, 503: -32013}.get(status, -32600)
    return web.json_response(error_body(None, code, message), status=status, headers=NO_STORE)


def answer(body: JsonObject) -> web.Response:
    return web.json_response(body, headers=NO_STORE)


def _tenant(request: web.Request) -> TenantRuntime | web.Response:
    tenant = request.app[RUNTIME].current.tenants.of_tenant(request.match_info["tenant"])
    return tenant if tenant is not None else refusal(404, "Not found: no such tenant")


def _when(wall_clock: float) -> str | None:
    if wall_clock <= 0:
        return None
    return datetime.fromtimestamp(wall_clock, UTC).isoformat(timespec="seconds")


def _summary(session: Session, wall_now: float, monotonic_now: float) -> JsonObject:
    return {
        "id": session.audit_id,
        "subject": principal_hash(session.tenant, session.subject),
        "created": _when(session.created),
        "last_seen": _when(wall_now - (monotonic_now - session.last_seen)),
        "era": Era.HANDSHAKE.value,  # (only the handshake era has sessions)
        "protocol_version": session.protocol_version,
        "get_stream_open": session.get_stream_open,
        "requests_in_flight": session.busy,
    }


async def running_config(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME].current
    listing = "".join(f"{digest}  {path}\n" for path, digest in runtime.files.items())
    return answer(
        {
            "sha256": hashlib.sha256(listing.encode()).hexdigest(),
            "files": [{"path": path, "sha256": digest} for path, digest in runtime.files.items()],
            "loaded_at": _when(runtime.loaded_at),
            "tenants": len(runtime.tenants),
        }
    )


async def list_sessions(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    if isinstance(tenant, web.Response):
        return tenant
    services = request.app[SERVICES]
    sessions = await services.sessions.of_tenant(tenant.id)
    wall_now, monotonic_now = time.time(), time.monotonic()
    listed = sorted((_summary(s, wall_now, monotonic_now) for s in sessions), key=lambda s: s["id"])
    body: JsonObject = {"tenant": tenant.id, "sessions": listed}
    if services.shared is not None:  # open streams and requests in flight: as this replica sees them
        here = {s.id for s in services.sessions.all()}
        body["shared"] = {"up": services.shared.up, "held_here": sum(s.id in here for s in sessions)}
    return answer(body)


async def end_session(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    if isinstance(tenant, web.Response):
        return tenant
    named = request.match_info["session"]
    services = request.app[SERVICES]
    if services.shared is not None and not services.shared.up:
        return refusal(503, "Service unavailable: the shared state store (Redis) cannot be reached")
    sessions = await services.sessions.of_tenant(tenant.id) if _SESSION_HASH.fullmatch(named) else []
    session = next((s for s in sessions if s.audit_id == named), None)
    if session is None:
        return refusal(404, "Not found: the tenant has no session with that id")
    await services.sessions.remove(session)  # the client's next request gets 404 at once
    try:
        status = await asyncio.wait_for(end_upstream_session(tenant.upstream, session), END_SESSION_SECONDS)
    except TimeoutError:
        status = 0
    log.info("admin_session_ended", tenant=tenant.id, session=session.audit_id, upstream_status=status)
    return answer(
        {"tenant": tenant.id, "session": session.audit_id, "ended": True, "upstream": _ended(status)}
    )


def _ended(status: int) -> str:
    """What the upstream made of the session's end."""
    if 200 <= status < 300:
        return "ended"
    if status == 0:
        return "unreachable (its session expires there on its own)"
    if status == 404:
        return "already ended"
    if status == 405:
        return "refused: the upstream does not let clients end sessions"
    return f"HTTP {status}"


async def flush_cache(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    if isinstance(tenant, web.Response):
        return tenant
    cache = request.app[SERVICES].cache
    if cache is None:
        return answer({"tenant": tenant.id, "cache": "off", "dropped": 0})
    try:
        dropped = await cache.flush(tenant.id)
    except StateUnavailable:
        return refusal(503, "Service unavailable: the shared state store (Redis) cannot be reached")
    log.info("admin_cache_flushed", tenant=tenant.id, dropped=dropped)
    return answer({"tenant": tenant.id, "cache": "flushed", "dropped": dropped})
