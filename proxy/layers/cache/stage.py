"""The cache layer in the flow: answers from the tenant's cache, single flight, store, invalidate.

lookup       Around: a hit answers at once; a miss leads the flight for its key (identical
             calls of the same tenant wait for it) and settles it however the exchange ends
store        response hook: a cacheable answer goes in, and its followers get it at once, unless
             the caller's session relayed or answered a server-to-client request meanwhile
             (an elicitation answer, a sampled message: the result may be that user's alone;
             followers then go upstream themselves), or a reload removed or changed the
             tenant since the exchange began (its generation moved on)
forgo        response hook: a server-to-client request on the exchange's stream lets its
             followers go upstream at once (they are not kept waiting for a result never stored)
invalidate   response hook: list_changed and resources/updated drop the tenant's copies
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from proxy.flow import Around, Call, Reply, Request, ServerKind, ServerMessage
from proxy.layers.cache.store import LIST_CHANGED, CacheKey, CachePlan, plan_for
from proxy.protocol.jsonrpc import MessageKind, answer_bytes
from proxy.types import Era

NO_STORE = {"Cache-Control": "no-store"}
_PLAN = "cache.plan"
INVALIDATING = (*LIST_CHANGED, "notifications/resources/updated")  # notifications invalidate handles
_FLIGHT = "cache.flight"
_SERVER_REQUESTS = "cache.server_requests"  # the session's count when the flight began
_GENERATION = "cache.generation"  # the tenant's generation then (a reload that changes it: a new one)


class Lookup(Around[Request]):
    """Answer from the tenant's cache, or wait for an identical call already on its way upstream;
    a miss leads the flight for its key until the exchange ends (its answer settles it at once when
    stored, or else on the way out: the followers then go upstream themselves)."""

    async def enter(self, call: Request) -> bool:
        message, tenant, cache = call.message, call.tenant, call.services.cache
        if cache is None or message.kind is not MessageKind.REQUEST:
            return False
        plan = plan_for(
            call.ctx.tenant,
            call.ctx.principal,
            tenant.cache_identity,
            call.protocol_version or "",
            call.era is Era.MODERN,
            message.method or "",
            message.params,
            tenant.policy.cache_ttl_seconds if tenant.policy is not None else None,
        )
        if plan is None:
            return False  # never answered from the cache: bypass
        call.slots[_PLAN] = plan
        for key in plan.lookup_keys:
            result = await cache.fetch(key)
            if result is not None:
                call.reply = _answer_from_cache(call, result)
                return False
        pending = cache.join(plan.flight_key)
        if pending is not None:  # an identical call leads: wait for what it stores
            try:
                timeout = tenant.config.upstream.read_timeout_seconds
                result = await asyncio.wait_for(asyncio.shield(pending), timeout)
            except TimeoutError:
                result = None
            if result is not None:
                call.reply = _answer_from_cache(call, result)
            else:
                call.cache_state = "miss"
            return False
        call.cache_state = "miss"
        call.slots[_FLIGHT] = plan.flight_key
        call.slots[_SERVER_REQUESTS] = _server_requests(call)
        call.slots[_GENERATION] = cache.generation(call.ctx.tenant)
        return True

    def leave(self, call: Request, failure: BaseException | None) -> None:
        flight: CacheKey | None = call.slots.pop(_FLIGHT, None)
        if flight is not None and call.services.cache is not None:
            call.services.cache.settle(flight, None)  # nothing was stored: followers go upstream


lookup = Lookup()


def _server_requests(call: Call) -> int:
    """How many server-to-client requests the caller's session has relayed or answered so far (a
    2026-07-28 exchange has none: its input_required results are never stored)."""
    return call.session.server_requests if call.session is not None else 0


def _answer_from_cache(call: Request, result: bytes) -> Reply:
    call.cache_state = "hit"
    call.record_result(result)
    body = answer_bytes(call.message.id, result)
    return web.Response(body=body, content_type="application/json", headers=NO_STORE)


def store(call: Call, message: ServerMessage) -> ServerMessage | None:
    """A cacheable answer goes into the tenant's cache; waiting followers get it at once."""
    cache = call.services.cache
    plan: CachePlan | None = call.slots.get(_PLAN)
    if message.kind is not ServerKind.ANSWER or cache is None or plan is None:
        return message
    if _server_requests(call) != call.slots.get(_SERVER_REQUESTS):
        return message  # the user answered the upstream meanwhile: the result may be theirs alone
    if cache.generation(call.ctx.tenant) != call.slots.get(_GENERATION):
        return message  # a reload removed or changed the tenant meanwhile: an old config's answer
    result = message.body.get("result")
    target = plan.store_key_and_ttl(result) if isinstance(result, dict) else None
    if target is None:
        return message
    raw = message.result_bytes()
    if raw is not None and cache.put(target[0], raw, target[1], call.tenant.cache_budget):
        flight: CacheKey | None = call.slots.pop(_FLIGHT, None)
        if flight is not None:
            cache.settle(flight, raw)
    return message


def forgo(call: Call, message: ServerMessage) -> ServerMessage | None:
    """The upstream asks this exchange's caller something: its result may be theirs alone and will
    not be stored, so identical calls waiting for it go upstream themselves now."""
    flight: CacheKey | None = call.slots.pop(_FLIGHT, None)
    if flight is not None and call.services.cache is not None:
        call.services.cache.settle(flight, None)
    return message


def invalidate(call: Call, message: ServerMessage) -> ServerMessage | None:
    """A list changed or a resource was updated: the tenant's cached copies go."""
    cache, method = call.services.cache, message.method
    if cache is None or message.kind is not ServerKind.NOTIFICATION or method is None:
        return message
    if method in LIST_CHANGED:
        cache.invalidate(call.ctx.tenant, LIST_CHANGED[method])
    elif method == "notifications/resources/updated":
        params = message.body.get("params")
        uri = params.get("uri") if isinstance(params, dict) else None
        if isinstance(uri, str):
            cache.invalidate(call.ctx.tenant, ("resources/read",), uri)
    return message
