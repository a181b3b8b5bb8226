"""The authenticate step: an Exchange becomes a Call, whose caller and tenant come from the token."""

from __future__ import annotations

import structlog
from aiohttp import hdrs

from proxy.flow import Call, Exchange, authenticated


async def authenticate(exchange: Exchange) -> Call:
    """The verified caller (401/403 otherwise); the tenant is the one its token names, and no other."""
    ctx = await exchange.runtime.authenticator.authenticate(
        exchange.request.headers.getall(hdrs.AUTHORIZATION, [])
    )
    structlog.contextvars.bind_contextvars(tenant=ctx.tenant)
    return authenticated(exchange, ctx, await exchange.runtime.tenants.for_caller(ctx))
