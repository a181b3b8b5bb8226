"""The MCP endpoint: one flow per HTTP method, each its whole life in one visible list.

Read a flow top to bottom to follow a request from the listener to the upstream and back (the
phases and stage kinds are explained in flow.py). Adding a rule means adding a stage or a hook
to the layer's own package and naming it here. With tracing on, `traced` adds the trace's steps
to each flow once, when the application is built (ops/tracing.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Generic

from aiohttp import web

from proxy.bridge import stage as bridge
from proxy.flow import (
    Around,
    C,
    Call,
    Check,
    DoneHook,
    Entered,
    Exchange,
    Hooks,
    Reply,
    Request,
    ServerKind,
    enter_stages,
    hook,
    leave_stages,
)
from proxy.http import relay
from proxy.http.edge import check_origin, error_reply
from proxy.http.intake import parse, require_event_stream
from proxy.http.keys import RUNTIME, SERVICES
from proxy.layers.auth.stage import authenticate
from proxy.layers.cache import stage as cache
from proxy.layers.containment import capabilities, extensions, recent_activity
from proxy.layers.containment.audit import audit_record
from proxy.layers.data_access import stage as data_access
from proxy.layers.limits import stage as limits
from proxy.layers.limits import work
from proxy.layers.limits.work import Metered
from proxy.layers.sessions import stage as sessions
from proxy.layers.sessions import tasks
from proxy.ops import drain
from proxy.ops.log import request_line
from proxy.ops.metrics import observe
from proxy.protocol.errors import MethodNotAllowed, ProxyError
from proxy.tenants import stage as tenants

if TYPE_CHECKING:
    from proxy.ops.tracing import Tracing

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Flow(Generic[C]):
    edge: Sequence[Check[Exchange]]
    authenticate: Callable[[Exchange], Awaitable[Call]]
    admitted: Sequence[Check[Call] | Around[Call]]  # before the body is read: refusals stay cheap
    parse: Callable[[Call], Awaitable[C]]
    stages: Sequence[Check[C] | Around[C]]
    forward: Callable[[C, Hooks], Awaitable[Reply]]
    hooks: Hooks  # every message coming back passes those about it, in this order
    done: Sequence[DoneHook]  # after the answer has left


async def as_is(call: Call) -> Call:
    """GET and DELETE carry no body to parse."""
    return call


ANSWER, NOTIFICATION, SERVER_REQUEST = ServerKind.ANSWER, ServerKind.NOTIFICATION, ServerKind.SERVER_REQUEST
LISTS = ("tools/list", "prompts/list")
LIST_CHANGED = ("notifications/tools/list_changed", "notifications/prompts/list_changed")
HOOKS = Hooks(
    (
        # an upstream error keeps its code, never its internals
        hook(relay.sanitize_answer, ANSWER),
        # roots/sampling/elicitation the policy answers itself
        hook(capabilities.server_requests, SERVER_REQUEST),
        # a notification naming another tenant's resource is dropped, on every stream
        hook(data_access.screen_notifications, NOTIFICATION),
        # extensions the proxy does not enforce are not offered
        hook(extensions.offer, ANSWER, methods=extensions.OFFERING_METHODS),
        # task ids: the proxy's own, bound to their caller; other callers' tasks never shown
        hook(tasks.created, ANSWER, methods=tasks.CREATING_METHODS),
        hook(tasks.answered, ANSWER, methods=tasks.ANSWERED_METHODS),
        hook(tasks.notified, NOTIFICATION, methods=tasks.NOTIFICATIONS),
        hook(tasks.untie, SERVER_REQUEST),
        # answered requests forgotten, server requests owed an answer
        hook(sessions.track, ANSWER, SERVER_REQUEST),
        # the tenant's catalog follows tools/prompts lists
        hook(data_access.learn, ANSWER, NOTIFICATION, methods=(*LISTS, *LIST_CHANGED)),
        # input_required: the policy's answers and a sealed requestState
        hook(capabilities.settle_input, ANSWER, methods=("tools/call", "prompts/get", "resources/read")),
        # lists filtered, tenant arguments hidden
        hook(data_access.filter_lists, ANSWER, methods=data_access.FILTERED),
        # the tenant's known resources follow its (filtered) resource lists
        hook(data_access.learn_resources, ANSWER, NOTIFICATION, methods=data_access.RESOURCE_LISTS),
        # proxy_recent_activity on the first tools/list page
        hook(recent_activity.offer, ANSWER, methods=("tools/list",)),
        # a cacheable answer stored; its followers answered (or, once the caller is asked, let go)
        hook(cache.store, ANSWER),
        hook(cache.forgo, SERVER_REQUEST),
        # list_changed and resources/updated drop cached copies
        hook(cache.invalidate, NOTIFICATION, methods=cache.INVALIDATING),
    )
)
DONE: Sequence[DoneHook] = (audit_record, observe, request_line)

POST: Flow[Request] = Flow(
    edge=(check_origin,),
    authenticate=authenticate,
    admitted=(tenants.hold, limits.admission),  # the tenant's runtime is not dropped while in use
    parse=parse,  # -> Request: one JSON-RPC message, its era and version
    stages=(
        sessions.bind,
        limits.streams,  # subscriptions/listen: a long-lived stream
        bridge.route,  # the upstream speaks another era: bridged (or -32022 at once when bridging is off)
        tasks.resolve,  # task ids name the caller's own tasks (else: an unknown task, no upstream call)
        capabilities.open_request_state,
        recent_activity.answer,
        data_access.check_mirrored_headers,
        data_access.enforce_policy,
        capabilities.restrict,
        bridge.declare,  # what the bridge keeps of the client's capabilities and info: bounded
        data_access.render_mirrored_headers,
        cache.lookup,
        limits.circuit,
        bridge.hold,  # a bridged 2026-07-28 request: its caller's held upstream session
    ),
    forward=relay.forward_post,
    hooks=HOOKS,
    done=DONE,
)
GET: Flow[Call] = Flow(
    edge=(check_origin,),
    authenticate=authenticate,
    admitted=(tenants.hold,),
    parse=as_is,
    stages=(require_event_stream, sessions.bind, limits.streams, bridge.session),
    forward=relay.relay_get,
    hooks=HOOKS,
    done=DONE,
)
DELETE: Flow[Call] = Flow(
    edge=(check_origin,),
    authenticate=authenticate,
    admitted=(tenants.hold,),
    parse=as_is,
    stages=(sessions.bind, bridge.session),
    forward=relay.forward_delete,
    hooks=Hooks(()),
    done=DONE,
)


# With tracing on: the stages whose passing is an event of the exchange's span, and the reports
# that name its trace.
TRACE_EVENTS: dict[object, str] = {data_access.enforce_policy: "policy", cache.lookup: "cache"}
NAMING_TRACE = (audit_record, request_line)


def traced(flow: Flow[C], tracing: Tracing) -> Flow[C]:
    """`flow` with its trace: a span from the edge to the report, events as stages pass, a client
    span around the upstream call (whose context goes upstream), the trace id in the reports."""
    return Flow(
        edge=(tracing.arrive, *flow.edge),
        authenticate=tracing.authenticate(flow.authenticate),
        admitted=flow.admitted,
        parse=flow.parse,
        stages=(tracing.open_span, *(tracing.event(stage, TRACE_EVENTS.get(stage)) for stage in flow.stages)),
        forward=tracing.upstream(flow.forward),
        hooks=flow.hooks,
        done=(
            tracing.close,
            *(tracing.naming_trace(report) if report in NAMING_TRACE else report for report in flow.done),
        ),
    )


async def serve(exchange: Exchange, flow: Flow[C]) -> Reply:
    """Run one exchange through its flow, in one coroutine (the await chain to the upstream stays
    short); whatever happens, every Around stage entered is left, and the report follows."""
    entered: Entered = []
    failure: BaseException | None = None
    try:
        for check in flow.edge:
            await check(exchange)
        call = await flow.authenticate(exchange)
        reply = await enter_stages(call, flow.admitted, entered)
        if reply is None:
            parsed = await flow.parse(call)
            reply = await enter_stages(parsed, flow.stages, entered)
            if reply is None:
                reply = await flow.forward(parsed, flow.hooks)
        exchange.status = reply.status  # (an upstream's error answer may keep its own status)
    except ProxyError as error:
        failure = error
        reply = error_reply(exchange, error)
    except (asyncio.CancelledError, ConnectionResetError) as error:  # the client went away (or we stop)
        failure = error
        if not exchange.delivered:
            exchange.outcome = "cancelled"
        if not exchange.services.drain.was_cut_short():
            raise
        reply = await drain.last_word(exchange)  # the stop's grace is over: a JSON-RPC error
    except BaseException as error:
        failure = error
        if not exchange.delivered:  # the edge answers it with a 500: the report says so
            exchange.refused(500, -32603)
        raise
    finally:
        raised = leave_stages(entered, failure)
        finish(exchange, flow.done)
        if raised is not failure and raised is not None:
            raise raised
    return reply


def finish(exchange: Exchange, done: Sequence[DoneHook]) -> None:
    """The report (audit record, metrics, one log line, never any content) follows the answer."""
    exchange.finished()
    exchange.services.reports.add(partial(_report, exchange, done))


def _report(exchange: Exchange, done: Sequence[DoneHook]) -> None:
    for report in done:
        report(exchange)


def mcp_handler(tracing: Tracing | None = None) -> Handler:
    """The MCP endpoint's handler: the flows above, traced when `tracing` is given (chosen here,
    once: untraced requests pay nothing for tracing)."""
    post, get, delete = (POST, GET, DELETE) if tracing is None else (
        traced(POST, tracing), traced(GET, tracing), traced(DELETE, tracing)
    )  # fmt: skip

    async def handle_mcp(request: web.Request) -> web.StreamResponse:
        app = request.app
        services = app[SERVICES]
        exchange = Exchange(request=request, runtime=app[RUNTIME].current, services=services)
        if request.method not in ("POST", "GET", "DELETE"):
            return error_reply(exchange, MethodNotAllowed(headers={"Allow": "GET, POST, DELETE"}))
        in_flight = services.drain.enter()  # a stop waits for it, and answers it if the grace runs out
        # Its time on the event loop is charged to its tenant (limits.work_share) before the answer
        # leaves: the tenant's next request is judged with it.
        meter: Metered[Reply]
        if request.method == "POST":
            meter = Metered(serve(exchange, post))
        else:
            meter = Metered(serve(exchange, get if request.method == "GET" else delete))
        try:
            return await meter
        finally:
            services.drain.leave(in_flight)
            tenant = exchange.tenant
            if meter.seconds and exchange.ctx is not None and tenant is not None:
                budget = services.limiter.of(exchange.ctx.tenant, tenant.limits).work
                work.charge(budget, meter.seconds, exchange.ctx.principal)

    return handle_mcp
