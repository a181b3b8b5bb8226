"""The MCP endpoint: one flow per HTTP method, each its whole life in one visible list.

Read a flow top to bottom to follow a request from the listener to the upstream and back (the
phases and stage kinds are explained in flow.py). Adding a rule means adding a stage or a hook
to the layer's own package and naming it here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Generic

from aiohttp import web

from proxy.flow import (
    Around,
    C,
    Call,
    Check,
    DoneHook,
    Exchange,
    Reply,
    Request,
    ResponseHook,
    around,
    run_stages,
)
from proxy.http import relay
from proxy.http.edge import check_origin, error_reply
from proxy.http.intake import parse, require_event_stream
from proxy.http.keys import RUNTIME, SERVICES
from proxy.layers.auth.stage import authenticate
from proxy.layers.cache import stage as cache
from proxy.layers.containment import capabilities, recent_activity
from proxy.layers.containment.audit import audit_record
from proxy.layers.data_access import stage as data_access
from proxy.layers.limits import stage as limits
from proxy.layers.sessions import stage as sessions
from proxy.ops.log import request_line
from proxy.ops.metrics import observe
from proxy.protocol.errors import MethodNotAllowed, ProxyError


@dataclass(frozen=True)
class Flow(Generic[C]):
    edge: Sequence[Check[Exchange]]
    authenticate: Callable[[Exchange], Awaitable[Call]]
    admitted: Sequence[Check[Call] | Around[Call]]  # before the body is read: refusals stay cheap
    parse: Callable[[Call], Awaitable[C]]
    stages: Sequence[Check[C] | Around[C]]
    forward: Callable[[C, Sequence[ResponseHook]], Awaitable[Reply]]
    hooks: Sequence[ResponseHook]  # every message coming back, in this order
    done: Sequence[DoneHook]  # after the answer has left


async def as_is(call: Call) -> Call:
    """GET and DELETE carry no body to parse."""
    return call


HOOKS: Sequence[ResponseHook] = (
    relay.sanitize_answer,  # an upstream error keeps its code, never its internals
    capabilities.server_requests,  # roots/sampling/elicitation the policy answers itself
    sessions.track,  # answered requests forgotten, server requests owed an answer
    data_access.learn,  # the tenant's catalog follows tools/prompts lists
    capabilities.settle_input,  # input_required: the policy's answers and a sealed requestState
    data_access.filter_lists,  # lists filtered, tenant arguments hidden
    recent_activity.offer,  # proxy_recent_activity on the first tools/list page
    cache.store,  # a cacheable answer stored; its followers answered
    cache.invalidate,  # list_changed and resources/updated drop cached copies
)
DONE: Sequence[DoneHook] = (audit_record, observe, request_line)

POST: Flow[Request] = Flow(
    edge=(check_origin,),
    authenticate=authenticate,
    admitted=(around(limits.admission),),
    parse=parse,  # -> Request: one JSON-RPC message, its era and version
    stages=(
        around(sessions.bind),
        capabilities.open_request_state,
        recent_activity.answer,
        data_access.check_mirrored_headers,
        data_access.enforce_policy,
        capabilities.restrict,
        data_access.render_mirrored_headers,
        around(cache.lookup),
        around(limits.circuit),
    ),
    forward=relay.forward_post,
    hooks=HOOKS,
    done=DONE,
)
GET: Flow[Call] = Flow(
    edge=(check_origin,),
    authenticate=authenticate,
    admitted=(),
    parse=as_is,
    stages=(require_event_stream, around(sessions.bind)),
    forward=relay.relay_get,
    hooks=HOOKS,
    done=DONE,
)
DELETE: Flow[Call] = Flow(
    edge=(check_origin,),
    authenticate=authenticate,
    admitted=(),
    parse=as_is,
    stages=(around(sessions.bind),),
    forward=relay.forward_delete,
    hooks=(),
    done=DONE,
)


async def serve(exchange: Exchange, flow: Flow[C]) -> Reply:
    """Run one exchange through its flow; whatever happens, it ends with its report."""
    current: list[Exchange] = [exchange]  # the latest phase: what the report reads

    async def after_admission(call: Call) -> Reply:
        parsed = await flow.parse(call)
        current[0] = parsed
        return await run_stages(parsed, flow.stages, partial(_forward, flow))

    try:
        for check in flow.edge:
            await check(exchange)
        call = await flow.authenticate(exchange)
        current[0] = call
        return await run_stages(call, flow.admitted, after_admission)
    except ProxyError as error:
        return error_reply(current[0], error)
    except asyncio.CancelledError:  # the client went away (or the proxy is stopping)
        if not current[0].delivered:
            current[0].outcome = "cancelled"
        raise
    finally:
        finish(current[0], flow.done)


async def _forward(flow: Flow[C], call: C) -> Reply:
    return await flow.forward(call, flow.hooks)


def finish(exchange: Exchange, done: Sequence[DoneHook]) -> None:
    """The report (audit record, metrics, one log line, never any content) follows the answer."""
    exchange.ended = time.perf_counter()
    exchange.ended_at = time.time()
    exchange.services.reports.add(partial(_report, exchange, done))


def _report(exchange: Exchange, done: Sequence[DoneHook]) -> None:
    for hook in done:
        hook(exchange)


async def handle_mcp(request: web.Request) -> web.StreamResponse:
    exchange = Exchange(request=request, runtime=request.app[RUNTIME].current, services=request.app[SERVICES])
    if request.method == "POST":
        return await serve(exchange, POST)
    if request.method == "GET":
        return await serve(exchange, GET)
    if request.method == "DELETE":
        return await serve(exchange, DELETE)
    return error_reply(exchange, MethodNotAllowed(headers={"Allow": "GET, POST, DELETE"}))
