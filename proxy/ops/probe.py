"""`check-config --probe`: what a valid config still needs from the world, tried for real.

Every HTTP upstream answers an MCP handshake with the tenant's own headers; every stdio program
exists, starts and completes the handshake (in a child of its own, stopped afterwards); every JWKS
URL serves usable keys; the state backend accepts its credentials. Each problem is one line,
`FILE: KEY PATH: what is wrong`, so a first run fails with the reason instead of a 502 later.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable
from typing import Final

import aiohttp
import jwt

from proxy import __version__
from proxy.config import ProxyConfig, UpstreamConfig
from proxy.protocol.errors import ProxyError, UpstreamError
from proxy.types import MODERN_VERSIONS
from proxy.upstreams.base import UpstreamRequest, incoming
from proxy.upstreams.http import HttpUpstream, failure_reason, redacted_url
from proxy.upstreams.stdio.upstream import HANDSHAKE_VERSION, StdioUpstream

PROBE_SECONDS: Final = 30.0  # per target: a first `npx -y` may download its package
STDIO_PROBES_AT_ONCE: Final = 4
_HEADERS: Final = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
_CLIENT_INFO: Final = {"name": "mcp-tenant-proxy check-config", "version": __version__}


def _initialize() -> bytes:
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": HANDSHAKE_VERSION, "capabilities": {}, "clientInfo": _CLIENT_INFO}}  # fmt: skip
    return json.dumps(body).encode()


def _discover() -> bytes:
    meta = {"io.modelcontextprotocol/clientInfo": _CLIENT_INFO}
    body = {"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta": meta}}
    return json.dumps(body).encode()


async def _handshake(upstream: HttpUpstream, body: bytes, headers: dict[str, str]) -> tuple[int, str | None]:
    """Send one handshake request: the HTTP status and a problem (None when it got a result)."""
    response = await upstream.send(UpstreamRequest("POST", {**_HEADERS, **headers}, body))
    try:
        if response.status >= 300:
            return response.status, f"answered HTTP {response.status}"
        async for batch in incoming(response):
            for item in batch:
                message = item.message
                if message is not None and message.get("id") == 1:
                    if isinstance(message.get("result"), dict):
                        if response.session_id is not None:
                            await _end_session(upstream, response.session_id)
                        return response.status, None
                    return response.status, "answered the MCP handshake with an error"
        return response.status, "answered without a result"
    finally:
        response.close()


async def _end_session(upstream: HttpUpstream, session_id: str) -> None:
    headers = {"Mcp-Session-Id": session_id, "MCP-Protocol-Version": HANDSHAKE_VERSION}
    with contextlib.suppress(ProxyError):
        (await upstream.send(UpstreamRequest("DELETE", headers))).close()


async def probe_http(tenant: str, config: UpstreamConfig) -> str | None:
    assert config.url is not None
    upstream = HttpUpstream(tenant, config)
    where = redacted_url(config.url)
    try:
        status, problem = await _handshake(upstream, _initialize(), {})
        if problem is not None and status not in (401, 403):  # perhaps a server of the modern era only
            version = next(iter(MODERN_VERSIONS))
            _, modern_problem = await _handshake(upstream, _discover(), {"MCP-Protocol-Version": version})
            problem = problem if modern_problem is not None else None
    except UpstreamError as error:
        cause = error.__cause__
        reason = failure_reason(cause) if cause is not None else error.message
        return f"{where}: unreachable ({reason})"
    finally:
        await upstream.close()
    if problem is not None and status in (401, 403):
        return f"{where}: {problem}: check the tenant's credentials in upstream.headers"
    return f"{where}: {problem}" if problem is not None else None


async def probe_stdio(tenant: str, config: UpstreamConfig, slots: asyncio.Semaphore) -> str | None:
    upstream = StdioUpstream(tenant, config)
    async with slots:
        try:
            problem = await upstream.probe()
        finally:
            await upstream.close()
    program = (config.command or ("",))[0]
    return f"{program}: {problem}" if problem is not None else None


async def probe_jwks(url: str, seconds: float) -> str | None:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=seconds)) as http,
            http.get(url, allow_redirects=False) as response,
        ):
            if response.status != 200:
                return f"{redacted_url(url)}: answered HTTP {response.status}"
            data = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return f"{redacted_url(url)}: unreachable ({failure_reason(exc)})"
    except ValueError:
        return f"{redacted_url(url)}: did not answer JSON"
    try:
        jwt.PyJWKSet.from_dict(data)
    except (jwt.PyJWTError, ValueError, TypeError, AttributeError) as exc:
        return f"{redacted_url(url)}: serves no usable keys ({exc})"
    return None


async def probe_state(config: ProxyConfig) -> str | None:
    from proxy.backends.redis.client import RedisState
    from proxy.ops.metrics import Metrics

    state = RedisState(config.state, Metrics(), config.source)
    try:
        await asyncio.wait_for(state.client.ping(), max(config.state.timeout_seconds, 5.0))
    except Exception as exc:  # any refusal is the answer: name its kind, never the URL's password
        return f"Redis did not accept the connection ({type(exc).__name__}: {exc})"
    finally:
        await state.close()
    return None


async def _bounded(probe: Awaitable[str | None]) -> str | None:
    try:
        return await asyncio.wait_for(probe, PROBE_SECONDS)
    except TimeoutError:
        return f"no answer within {PROBE_SECONDS:g} s"


async def probe_config(config: ProxyConfig) -> list[str]:
    """One line per problem found, `FILE: KEY PATH: problem`; empty when everything answered."""
    slots = asyncio.Semaphore(STDIO_PROBES_AT_ONCE)
    checks: dict[str, Awaitable[str | None]] = {}
    for tenant_id, tenant in config.tenants.items():
        upstream = tenant.upstream
        if upstream.url is not None:
            checks[f"tenants.{tenant_id}.upstream.url"] = probe_http(tenant_id, upstream)
        else:
            checks[f"tenants.{tenant_id}.upstream.command"] = probe_stdio(tenant_id, upstream, slots)
    for index, issuer in enumerate(config.auth.issuers):
        if issuer.jwks_url is not None:
            checks[f"auth.issuers.{index}.jwks_url"] = probe_jwks(
                issuer.jwks_url, issuer.jwks_timeout_seconds
            )
    if config.state.backend == "redis":
        checks["state.url"] = probe_state(config)
    results = await asyncio.gather(*(_bounded(check) for check in checks.values()))
    return [
        f"{config.source}: {key_path}: {problem}"
        for key_path, problem in zip(checks, results, strict=True)
        if problem is not None
    ]
