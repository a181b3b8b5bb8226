"""The request stages, and the one place where each HTTP method's stage list is assembled.

    POST:   check_origin -> authenticate -> apply_limits -> read_message -> resolve_era -> bind_session
            -> open_request_state -> check_mirrored_headers -> enforce_policy
            -> enforce_client_capabilities -> render_mirrored_headers -> lookup_cache -> [upstream]
    GET:    check_origin -> authenticate -> require_event_stream -> bind_session -> [upstream stream]
    DELETE: check_origin -> authenticate -> bind_session -> [upstream DELETE]

A stage is `async (Exchange) -> None`; it refuses by raising a ProxyError (which becomes the
client's answer, with no upstream call) or answers early by setting `exchange.reply`.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence

import structlog
from aiohttp import StreamReader, hdrs, web

from proxy.layers.cache.store import plan_for
from proxy.layers.data_access.stage import catalog_entry, enforce_client_capabilities, enforce_policy
from proxy.protocol.errors import (
    BadRequest,
    BodyTooLarge,
    Forbidden,
    InvalidParams,
    MethodNotAllowed,
    MethodNotFound,
    MissingSession,
    NotAcceptable,
    ProxyError,
    RequestTimeout,
    UnsupportedMediaType,
    UnsupportedProtocolVersion,
)
from proxy.protocol.headers import (
    METHOD_HEADER,
    NAME_HEADER,
    PARAM_HEADER_PREFIX,
    PROTOCOL_VERSION_HEADER,
    arguments_of,
    check_modern_envelope,
    check_param_headers,
    name_header_for,
    render_param_headers,
)
from proxy.protocol.jsonrpc import KNOWN_METHODS, Kind, answer_bytes, parse_message
from proxy.types import DEFAULT_HANDSHAKE_VERSION, HANDSHAKE_VERSIONS, MODERN_VERSIONS, Era, Exchange

Stage = Callable[[Exchange], Awaitable[None]]
NO_STORE = {"Cache-Control": "no-store"}
SESSION_HEADER = "Mcp-Session-Id"
ALL_VERSIONS = sorted(MODERN_VERSIONS | HANDSHAKE_VERSIONS)
_SINGLE_HEADERS = (PROTOCOL_VERSION_HEADER, METHOD_HEADER, NAME_HEADER, SESSION_HEADER, "Last-Event-ID")


def single_header(exchange: Exchange, name: str) -> str | None:
    """A header that must appear at most once (two copies would let two readers disagree)."""
    values = exchange.request.headers.getall(name, [])
    if len(values) > 1:
        raise BadRequest(f"Bad request: the {name} header appears more than once")
    return values[0] if values else None


async def check_origin(exchange: Exchange) -> None:
    origins = exchange.request.headers.getall(hdrs.ORIGIN, [])
    if len(origins) > 1 or (origins and not exchange.runtime.origins.allows(origins[0])):
        raise Forbidden("Forbidden: Origin not allowed")


async def authenticate(exchange: Exchange) -> None:
    ctx = await exchange.runtime.authenticator.authenticate(
        exchange.request.headers.getall(hdrs.AUTHORIZATION, [])
    )
    exchange.ctx = ctx
    exchange.tenant = exchange.runtime.tenants[ctx.tenant]
    structlog.contextvars.bind_contextvars(tenant=ctx.tenant)


async def apply_limits(exchange: Exchange) -> None:
    """The tenant's rate and concurrency limits; a refusal makes no upstream call."""
    ctx, tenant = exchange.ctx, exchange.tenant
    assert ctx is not None and tenant is not None
    try:
        exchange.admission = await exchange.services.limiter.admit(ctx.tenant, tenant.limits)
    except ProxyError as refusal:
        kind = refusal.data.get("limit", "other") if isinstance(refusal.data, dict) else "other"
        exchange.services.metrics.limited.labels(ctx.tenant, kind).inc()
        exchange.outcome = "denied"  # CONTRACT.md outcomes: ok|error|denied|spoof; the kind is in `limited`
        raise


@functools.lru_cache(maxsize=256)
def _media_types(accept: str) -> frozenset[str]:
    """The media types an Accept header lists (clients send the same few headers over and over)."""
    return frozenset(part.split(";")[0].strip().lower() for part in accept.split(","))


def _accepts(accept: str, media_type: str) -> bool:
    kinds = _media_types(accept)
    return media_type in kinds or "*/*" in kinds or f"{media_type.split('/')[0]}/*" in kinds


async def read_message(exchange: Exchange) -> None:
    request = exchange.request
    if request.content_type != "application/json":
        raise UnsupportedMediaType("Unsupported media type: Content-Type must be application/json")
    accept = ",".join(request.headers.getall(hdrs.ACCEPT, []))
    if not (_accepts(accept, "application/json") and _accepts(accept, "text/event-stream")):
        raise NotAcceptable("Not acceptable: Accept must list application/json and text/event-stream")
    limit = exchange.runtime.config.listen.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"Request body too large: the limit is {limit} bytes")
    content = request.content
    if content.is_eof():  # the whole body came with the headers (the usual case): no waiting
        body = content.read_nowait()
        if len(body) > limit:
            raise BodyTooLarge(f"Request body too large: the limit is {limit} bytes")
    else:
        body = await _read_body(content, limit, exchange.runtime.config.listen.body_timeout_seconds)
    exchange.message = parse_message(body)


async def _read_body(content: StreamReader, limit: int, seconds: float) -> bytes:
    body = bytearray()
    try:
        async with asyncio.timeout(seconds):
            async for chunk in content.iter_any():
                body += chunk
                if len(body) > limit:
                    raise BodyTooLarge(f"Request body too large: the limit is {limit} bytes")
    except TimeoutError:
        raise RequestTimeout() from None
    return bytes(body)


def _era_of(exchange: Exchange) -> tuple[Era, str | None]:
    """The era a request belongs to, and the protocol version it speaks (None: initialize decides)."""
    message = exchange.message
    assert message is not None
    headers = exchange.request.headers
    version = headers.get(PROTOCOL_VERSION_HEADER)
    has_session = SESSION_HEADER in headers
    if message.method == "initialize" and not has_session and version not in MODERN_VERSIONS:
        return Era.HANDSHAKE, None
    if has_session or version in HANDSHAKE_VERSIONS:
        if version is not None and version not in HANDSHAKE_VERSIONS:
            raise UnsupportedProtocolVersion(
                "Unsupported protocol version for a session",
                data={"supported": ALL_VERSIONS, "requested": version},
            )
        if not has_session:
            raise MissingSession()
        return Era.HANDSHAKE, version or DEFAULT_HANDSHAKE_VERSION
    if version is None or version in MODERN_VERSIONS or "_meta" in message.params:
        # The modern ladder: headers must agree with the body before the version is judged.
        checked = check_modern_envelope(
            message, version, headers.get(METHOD_HEADER), headers.get(NAME_HEADER)
        )
        return Era.MODERN, checked
    raise UnsupportedProtocolVersion(data={"supported": ALL_VERSIONS, "requested": version})


async def resolve_era(exchange: Exchange) -> None:
    """Decide the protocol era from headers and body, and check what that era requires."""
    message = exchange.message
    assert message is not None
    for name in _SINGLE_HEADERS:
        single_header(exchange, name)
    era, version = _era_of(exchange)
    exchange.era, exchange.protocol_version = era, version
    if message.kind is Kind.RESPONSE:
        if era is Era.MODERN:
            raise BadRequest(
                "Invalid request: the 2026-07-28 protocol has no server-to-client requests to answer"
            )
    elif message.method not in KNOWN_METHODS[era]:
        raise MethodNotFound(
            f"Method not found: {str(message.method)[:100]!r}", status=404 if era is Era.MODERN else 200
        )
    if version is not None:
        exchange.upstream_headers[PROTOCOL_VERSION_HEADER] = version
    if era is Era.MODERN:
        exchange.upstream_headers[METHOD_HEADER] = str(message.method)
        mirrored_name = name_header_for(message)
        if mirrored_name is not None:
            exchange.upstream_headers[NAME_HEADER] = mirrored_name


async def bind_session(exchange: Exchange) -> None:
    """Handshake era: the session must be the caller's own; initialize must fit under the cap."""
    ctx = exchange.ctx
    assert ctx is not None
    if exchange.request.method != "POST":
        session_id = single_header(exchange, SESSION_HEADER)
        if session_id is None:
            if PROTOCOL_VERSION_HEADER in exchange.request.headers and (
                exchange.request.headers[PROTOCOL_VERSION_HEADER] in HANDSHAKE_VERSIONS
            ):
                raise MissingSession()
            raise MethodNotAllowed(
                "Method not allowed: without a session only POST is served", headers={"Allow": "POST"}
            )
        exchange.era = Era.HANDSHAKE
    elif exchange.era is not Era.HANDSHAKE:
        return
    else:
        session_id = exchange.request.headers.get(SESSION_HEADER)
    registry = exchange.services.sessions
    if session_id is None:  # initialize
        exchange.session_reservation = await registry.reserve(ctx)
        return
    session = await registry.lookup(session_id, ctx)
    if exchange.message is not None and exchange.message.method == "initialize":
        # Never forwarded: it would re-initialize the upstream session (a shared stdio child's too).
        raise BadRequest("Invalid request: initialize starts a new session; send it without Mcp-Session-Id")
    exchange.session = session
    if exchange.request.method == "POST":
        session.busy += 1
        exchange.holds_session = True
    if exchange.protocol_version is None:
        exchange.protocol_version = session.protocol_version
    message = exchange.message
    if message is not None and message.kind is Kind.RESPONSE:
        assert message.id is not None
        if not await registry.take_answer(session, message.id):
            raise BadRequest("Invalid request: this session has no pending server request with that id")


async def open_request_state(exchange: Exchange) -> None:
    """A multi-round-trip retry is forwarded only with a requestState issued to this same caller for
    this same request; its inputResponses are the ones the client was asked for, plus the proxy's own
    (a roots/list the policy answers), and the upstream gets its own requestState back."""
    message, ctx = exchange.message, exchange.ctx
    if message is None or ctx is None or message.kind is not Kind.REQUEST:
        return
    params = message.params
    if "requestState" not in params:
        if "inputResponses" in params:
            raise InvalidParams(
                "Invalid params: inputResponses answer an input_required result; send its requestState too"
            )
        return
    state = exchange.services.request_states.open(
        ctx, message.method or "", message.name, params["requestState"]
    )
    if state is None:
        raise InvalidParams(
            "Invalid params: requestState was not issued to this caller for this request, or has expired; "
            "start the request again"
        )
    if state.upstream_state is None:
        del params["requestState"]
    else:
        params["requestState"] = state.upstream_state
    given = params.get("inputResponses")
    responses = {k: v for k, v in given.items() if k in state.expected} if isinstance(given, dict) else {}
    responses.update(state.answers)
    if responses or "inputResponses" in params:
        params["inputResponses"] = responses


def _sent_param_headers(exchange: Exchange) -> dict[str, list[str]]:
    prefix = PARAM_HEADER_PREFIX.lower()
    sent: dict[str, list[str]] = {}
    for header_name, value in exchange.request.headers.items():
        lowered = header_name.lower()
        if lowered.startswith(prefix):
            sent.setdefault(lowered, []).append(value)
    return sent


async def check_mirrored_headers(exchange: Exchange) -> None:
    """Modern tools/call: the Mcp-Param-* headers the client sent must agree with its body."""
    message = exchange.message
    if exchange.era is not Era.MODERN or message is None or message.method != "tools/call":
        return
    sent = _sent_param_headers(exchange)
    entry = await catalog_entry(exchange, fetch=bool(sent))
    if entry is None or entry.param_headers is None:
        return  # headers no declaration covers are simply not forwarded
    annotations = entry.param_headers
    policy = exchange.tenant.policy if exchange.tenant is not None else None
    if policy is not None and policy.hide_from_schema:
        # A hidden tenant argument is one the client cannot know to mirror: the proxy owns it.
        annotations = tuple(
            a
            for a in annotations
            if a.path[-1] not in policy.tenant_argument_names or a.header.lower() in sent
        )
    check_param_headers(annotations, arguments_of(message), sent)


async def render_mirrored_headers(exchange: Exchange) -> None:
    """The Mcp-Param-* headers sent upstream, rendered from the body as the policy left it."""
    message = exchange.message
    if exchange.era is not Era.MODERN or message is None or message.method != "tools/call":
        return
    entry = await catalog_entry(exchange, fetch=False)
    if entry is not None and entry.param_headers:
        exchange.upstream_headers.update(render_param_headers(entry.param_headers, arguments_of(message)))


async def lookup_cache(exchange: Exchange) -> None:
    """Answer from the tenant's cache, or wait for an identical call already on its way upstream."""
    cache, message, ctx, tenant = exchange.services.cache, exchange.message, exchange.ctx, exchange.tenant
    if cache is None or message is None or ctx is None or tenant is None or message.kind is not Kind.REQUEST:
        return
    plan = plan_for(
        ctx.tenant,
        ctx.subject,
        tenant.cache_identity,
        exchange.protocol_version or "",
        exchange.era is Era.MODERN,
        message.method or "",
        message.params,
        tenant.policy.cache_ttl_seconds if tenant.policy is not None else None,
    )
    if plan is None:
        return
    exchange.cache_plan = plan
    for key in plan.lookup_keys:
        result = await cache.fetch(key)
        if result is not None:
            _answer_from_cache(exchange, result)
            return
    pending = cache.join(plan.flight_key)
    if pending is None:
        exchange.cache_flight = plan.flight_key
    else:
        timeout = tenant.config.upstream.read_timeout_seconds
        try:
            result = await asyncio.wait_for(asyncio.shield(pending), timeout)
        except TimeoutError:
            result = None
        if result is not None:
            _answer_from_cache(exchange, result)
            return
    exchange.cache_state = "miss"


def _answer_from_cache(exchange: Exchange, result: bytes) -> None:
    assert exchange.message is not None
    exchange.cache_state = "hit"
    exchange.record_result(result)
    body = answer_bytes(exchange.message.id, result)
    exchange.reply = web.Response(body=body, content_type="application/json", headers=NO_STORE)


async def require_event_stream(exchange: Exchange) -> None:
    accept = ",".join(exchange.request.headers.getall(hdrs.ACCEPT, []))
    if not _accepts(accept, "text/event-stream"):
        raise NotAcceptable("Not acceptable: a GET stream needs Accept: text/event-stream")


POST_STAGES: Sequence[Stage] = (
    check_origin,
    authenticate,
    apply_limits,
    read_message,
    resolve_era,
    bind_session,
    open_request_state,
    check_mirrored_headers,
    enforce_policy,
    enforce_client_capabilities,
    render_mirrored_headers,
    lookup_cache,
)
GET_STAGES: Sequence[Stage] = (check_origin, authenticate, require_event_stream, bind_session)
DELETE_STAGES: Sequence[Stage] = (check_origin, authenticate, bind_session)


async def run_stages(exchange: Exchange, stages: Sequence[Stage]) -> None:
    for stage in stages:
        await stage(exchange)
        if exchange.reply is not None:
            return
