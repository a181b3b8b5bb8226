"""The limits layer in the flow: a place under the tenant's rate and concurrency limits for the
whole exchange (taken before the body is read, given back when the exchange ends), and the
tenant's circuit breaker around the upstream call.

The breaker learns only the upstream's own faults (`Call.upstream_fault`, set by the relay:
unreachable, 5xx, timeout, malformed or missing answer, a crashed child). A client that goes away
or cancels teaches it nothing, nor does an answer the upstream did give (a 4xx, a JSON-RPC error);
timeouts and HTTP 500 answers open it only when requests of more than one principal met them
(limiter.CircuitBreaker).
"""

from __future__ import annotations

import asyncio
import time

from proxy.flow import Around, Call, Request
from proxy.layers.limits.limiter import Admission as Admitted
from proxy.layers.limits.limiter import TenantLimits
from proxy.protocol.errors import ProxyError, UpstreamTimeout

_ADMITTED = "limits.admitted"  # the exchange's place under its tenant's limits
_LIMITS = "limits.tenant"  # this process's view of the tenant's limits (its circuit breaker)
_TRIAL = "limits.trial"  # the exchange is the half-open circuit's trial, not yet decided
_STREAM = "limits.stream"  # the tenant's limits a stream of this exchange is counted against
_STREAM_KIND = "limits.stream_kind"  # get | listen, as the open-streams gauge counts it
HELD_WHEN_UNLIMITED = 16  # refusals of a tenant held at once when it has no concurrency limit


class Admission(Around[Call]):
    """The tenant's rate, concurrency, bytes and work limits: a place for the whole exchange, or a
    refusal (429 with Retry-After) that makes no upstream call and reads no body."""

    async def enter(self, call: Call) -> bool:
        tenant, settings = call.ctx.tenant, call.tenant.limits
        body_bytes = 0
        if call.request.method == "POST":  # charged before the body is read (unknown length: the most)
            length = call.request.content_length
            body_bytes = length if length is not None else call.runtime.config.listen.max_body_bytes
        limiter = call.services.limiter
        limits = limiter.of(tenant, settings)
        try:
            limiter.loop_share.admit(tenant, limits.work, call.ctx.principal)
            admitted = await limiter.admit(tenant, settings, body_bytes)
        except ProxyError as refusal:
            _refused(call, refusal.data.get("limit", "other") if isinstance(refusal.data, dict) else "other")
            call.outcome = "denied"
            await _hold(call, limits, refusal)
            raise
        call.slots[_ADMITTED] = admitted
        return True

    def leave(self, call: Call, failure: BaseException | None) -> None:
        call.services.limiter.release(call.ctx.tenant, call.slots.pop(_ADMITTED))


async def _hold(call: Call, limits: TenantLimits, refusal: ProxyError) -> None:
    """A refusal whose body is still on its way is answered only after `refusal_hold_seconds` (and
    then the connection closes: edge.error_reply). Meanwhile the connection costs nothing: the body
    stays in the socket (the server stops reading past its buffer). A client that ignores
    Retry-After and sends its large bodies again at once would otherwise turn each refusal, its
    reconnect and the upload it starts into load; held, it goes at the hold's pace. At most the
    tenant's concurrency limit is held at once, so a flooder cannot pin sockets beyond it."""
    seconds = limits.settings.refusal_hold_seconds
    if not seconds or call.request.content.is_eof():
        return
    if limits.held >= (limits.settings.max_concurrent or HELD_WHEN_UNLIMITED):
        return
    retry_after = refusal.headers.get("Retry-After", "")
    if retry_after.isdigit():
        seconds = min(seconds, float(retry_after))
    limits.held += 1
    try:
        await asyncio.sleep(seconds)
    finally:
        limits.held -= 1


class Circuit(Around[Request]):
    """Fail fast while the tenant's upstream circuit is open; tell the breaker how the call went."""

    async def enter(self, call: Request) -> bool:
        admitted: Admitted | None = call.slots.get(_ADMITTED)
        limits = (
            admitted.limits
            if admitted is not None
            else call.services.limiter.of(call.ctx.tenant, call.tenant.limits)
        )
        call.slots[_LIMITS] = limits
        if not limits.settings.circuit_failures:
            return True
        try:
            trial = limits.admit_upstream()
        except ProxyError:
            _refused(call, "circuit")
            raise
        if trial:
            call.slots[_TRIAL] = True

            def answered(status: int) -> None:
                # The upstream answers again: decide the trial now, not when a long stream ends, so
                # the tenant's other requests need not wait for it (its outcome still counts below).
                if status < 500 and call.slots.pop(_TRIAL, False):
                    limits.breaker.record(True, time.monotonic())

            call.on_upstream_status.append(answered)
        return True

    def leave(self, call: Request, failure: BaseException | None) -> None:
        limits: TenantLimits = call.slots[_LIMITS]
        fault = call.upstream_fault
        if fault:
            kind = "timeout" if call.error_code == UpstreamTimeout.code else "error"
            call.services.metrics.upstream_errors.labels(call.ctx.tenant, kind).inc()
        if not limits.settings.circuit_failures:
            return
        if fault is not None:
            # A timeout or a 500 (the server's own error, not a 502-504 of what runs it) may follow
            # from the caller's own arguments.
            by_request = call.error_code == UpstreamTimeout.code or call.upstream_status == 500
            limits.breaker.record(
                not fault, time.monotonic(), call.ctx.principal if fault and by_request else None
            )
        elif call.slots.pop(
            _TRIAL, False
        ):  # the trial ended without a verdict (client gone): another may try
            limits.breaker.abandon()


class Streams(Around[Call]):
    """Long-lived streams (a session's GET stream, subscriptions/listen) have their own per-tenant
    cap, `limits.max_streams` (per replica: a stream is held by the replica that serves it), and
    are counted as they open and close (the open-streams gauge)."""

    async def enter(self, call: Call) -> bool:
        if call.request.method == "POST" and (
            call.message is None or call.message.method != "subscriptions/listen"
        ):
            return False
        limits = call.services.limiter.of(call.ctx.tenant, call.tenant.limits)
        try:
            limits.open_stream()
        except ProxyError:
            _refused(call, "streams")
            call.outcome = "denied"
            raise
        call.slots[_STREAM] = limits
        kind = call.slots[_STREAM_KIND] = "get" if call.request.method == "GET" else "listen"
        call.services.metrics.stream_opened(call.ctx.tenant, kind)
        return True

    def leave(self, call: Call, failure: BaseException | None) -> None:
        limits: TenantLimits = call.slots.pop(_STREAM)
        limits.close_stream()
        call.services.metrics.stream_closed(call.ctx.tenant, call.slots.pop(_STREAM_KIND))


def _refused(call: Call, limit: str) -> None:
    """Counted, and logged with the other refusals of its tenant and limit (never line by line)."""
    call.limited = limit
    call.services.metrics.count_limited(call.ctx.tenant, limit)
    call.services.limiter.refusals.note(call.ctx.tenant, limit)


admission = Admission()
circuit = Circuit()
streams = Streams()
