"""The limits layer in the flow: a place under the tenant's rate and concurrency limits for the
whole exchange (taken before the body is read, given back when the exchange ends), and the
tenant's circuit breaker around the upstream call.

The breaker learns only the upstream's own faults (`Call.upstream_fault`, set by the relay:
unreachable, 5xx, timeout, malformed or missing answer, a crashed child). A client that goes away
or cancels teaches it nothing, nor does an answer the upstream did give (a 4xx, a JSON-RPC error).
"""

from __future__ import annotations

import time

from proxy.flow import Call, Next, Reply, Request
from proxy.protocol.errors import ProxyError, UpstreamTimeout


async def admission(call: Call, call_next: Next) -> Reply:
    """The tenant's rate and concurrency limits; a refusal makes no upstream call."""
    limiter, tenant = call.services.limiter, call.ctx.tenant
    try:
        admitted = await limiter.admit(tenant, call.tenant.limits)
    except ProxyError as refusal:
        kind = refusal.data.get("limit", "other") if isinstance(refusal.data, dict) else "other"
        call.services.metrics.limited.labels(tenant, kind).inc()
        call.outcome = "denied"
        raise
    try:
        return await call_next()
    finally:
        limiter.release(tenant, admitted)


async def circuit(call: Request, call_next: Next) -> Reply:
    """Fail fast while the tenant's upstream circuit is open; tell the breaker how the call went."""
    limits = call.services.limiter.of(call.ctx.tenant, call.tenant.limits)
    breaking = bool(limits.settings.circuit_failures)
    try:
        trial = limits.admit_upstream() if breaking else False
    except ProxyError:
        call.services.metrics.limited.labels(call.ctx.tenant, "circuit").inc()
        raise
    pending = [trial]

    def answered(status: int) -> None:
        # The upstream answers again: decide the trial now, not when a long stream ends, so the
        # tenant's other requests need not wait for it (its outcome still counts below).
        if pending[0] and status < 500:
            limits.breaker.record(True, time.monotonic())
            pending[0] = False

    call.on_upstream_status.append(answered)
    try:
        return await call_next()
    finally:
        fault = call.upstream_fault
        if fault:
            kind = "timeout" if call.error_code == UpstreamTimeout.code else "error"
            call.services.metrics.upstream_errors.labels(call.ctx.tenant, kind).inc()
        if not breaking:
            pass
        elif fault is not None:
            limits.breaker.record(not fault, time.monotonic())
        elif pending[0]:  # the trial ended without a verdict (client gone): let another request try
            limits.breaker.abandon()
