"""An RS256 issuer whose keys come from a JWKS endpoint the test runs (and counts, stops, rotates).

What THREATS.md A asks of JWKS: keys are fetched once and cached; unknown kids cannot cause a fetch
storm; when the endpoint is down or slow the last good keys keep working; a rotated key is picked
up after the refetch cooldown; key-pointing headers never cause an outbound request.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.config import ProxyConfig
from proxy.http.keys import RUNTIME
from proxy.http.server import start_server
from proxy.protocol.errors import Unauthenticated
from tests.conftest import MCP_ACCEPT, proxy_config
from tests.factories import RsaKeys
from tests.upstreams import free_port

pytestmark = pytest.mark.e2e

JWKS_ISS = "https://jwks.idp.test"
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}
AUTHENTICATED = 400  # a body of b"{" after a good token: the parse error proves auth passed
UNAUTHENTICATED = 401
COOLDOWN = 1.0  # long enough that "within the cooldown" holds on a loaded machine


@dataclass
class JwksServer:
    """A tiny JWKS endpoint: serves `keys`, counts every request, can misbehave on demand."""

    keys: list[dict[str, Any]]
    mode: str = "ok"  # ok | error | garbage | empty | slow
    hits: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks.json"

    @property
    def evil_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/evil.json"

    def fetches(self) -> int:
        return sum(1 for path in self.hits if path == "/jwks.json")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.path)
        if request.path != "/jwks.json":
            return web.json_response({"keys": self.keys})
        if self.mode == "error":
            return web.Response(status=503, text="down for maintenance")
        if self.mode == "garbage":
            return web.Response(status=200, text="<html>captive portal</html>", content_type="text/html")
        if self.mode == "empty":
            return web.json_response({"keys": []})
        if self.mode == "slow":
            await asyncio.sleep(3)
        return web.json_response({"keys": self.keys})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{name}", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@dataclass
class JwksProxy:
    url: str
    jwks: JwksServer
    app: web.Application

    def verified_tokens(self) -> int:
        """How many tokens the running config's verified-token cache holds."""
        return len(self.app[RUNTIME].current.authenticator._verified)

    def token(
        self,
        key: RsaKeys | ec.EllipticCurvePrivateKey,
        kid: str | None = None,
        algorithm: str = "RS256",
        headers: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        body = {
            "iss": JWKS_ISS,
            "aud": self.url,
            "sub": "alice",
            "tenant": "acme",
            "iat": now,
            "exp": now + 600,
        }
        body.update(claims)
        if isinstance(key, RsaKeys):
            signer: Any = _private(key.private_pem)
            kid = key.kid if kid is None else kid
        else:
            signer = key
        return jwt.encode(body, signer, algorithm=algorithm, headers={"kid": kid, **(headers or {})})

    async def post(
        self, token: str, http: aiohttp.ClientSession, raw: bytes = b"{"
    ) -> tuple[int, dict[str, str], bytes]:
        headers = {
            "Accept": MCP_ACCEPT,
            "Content-Type": "application/json",
            "Authorization": f"Bearer {token}",
        }
        async with http.post(self.url, data=raw, headers=headers) as response:
            return response.status, dict(response.headers), await response.read()

    async def statuses(self, tokens: list[str]) -> list[int]:
        async with aiohttp.ClientSession() as http:
            results = await asyncio.gather(*(self.post(token, http) for token in tokens))
        return [status for status, _, _ in results]


_loaded: dict[bytes, Any] = {}


def _private(pem: bytes) -> Any:
    if pem not in _loaded:
        _loaded[pem] = serialization.load_pem_private_key(pem, password=None)
    return _loaded[pem]


@pytest.fixture(scope="module")
def key1() -> RsaKeys:
    return RsaKeys.generate("kid-1")


@pytest.fixture(scope="module")
def key2() -> RsaKeys:
    return RsaKeys.generate("kid-2")


@pytest.fixture
async def jwks_server(key1: RsaKeys) -> AsyncIterator[JwksServer]:
    server = JwksServer([key1.jwk()])
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


StartProxy = Callable[..., Any]


@pytest.fixture
async def start_proxy(
    jwks_server: JwksServer, upstreams: dict[str, Any], tmp_path: Path, rsa_keys: RsaKeys
) -> AsyncIterator[StartProxy]:
    runners: list[web.AppRunner] = []

    @asynccontextmanager
    async def start(**issuer: Any) -> AsyncIterator[JwksProxy]:
        url = f"http://127.0.0.1:{free_port()}/mcp"
        data = proxy_config(url, upstreams, tmp_path, rsa_keys)
        data["auth"]["issuers"].append(
            {
                "issuer": JWKS_ISS,
                "audiences": [url],
                "algorithms": ["RS256"],
                "jwks_url": jwks_server.url,
                "tenant_claim": "tenant",
                "jwks_timeout_seconds": 1.0,
                **issuer,
            }
        )
        runner, _ = await start_server(ProxyConfig.model_validate(data, context={}))
        runners.append(runner)
        yield JwksProxy(url, jwks_server, runner.app)

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_keys_are_fetched_once_and_cached(
    start_proxy: StartProxy, key1: RsaKeys, upstreams: dict[str, Any]
) -> None:
    async with start_proxy(jwks_cache_seconds=300, jwks_refetch_cooldown_seconds=30) as proxy:
        assert proxy.jwks.fetches() == 0  # nothing is fetched before a token needs it
        token = proxy.token(key1)
        async with aiohttp.ClientSession() as http:
            status, headers, _ = await proxy.post(token, http, json.dumps(INITIALIZE).encode())
        assert status == 200
        assert "Mcp-Session-Id" in headers
        assert await proxy.statuses([proxy.token(key1) for _ in range(10)]) == [AUTHENTICATED] * 10
        assert await proxy.statuses([proxy.token(key1) for _ in range(30)]) == [AUTHENTICATED] * 30
        assert proxy.jwks.fetches() == 1
        assert upstreams["acme"].recorder.snapshot()


async def test_a_cold_cache_under_concurrency_fetches_once(start_proxy: StartProxy, key1: RsaKeys) -> None:
    async with start_proxy(jwks_cache_seconds=300, jwks_refetch_cooldown_seconds=30) as proxy:
        assert await proxy.statuses([proxy.token(key1) for _ in range(20)]) == [AUTHENTICATED] * 20
        assert proxy.jwks.fetches() == 1


async def test_unknown_kids_cannot_cause_a_fetch_storm(start_proxy: StartProxy, key1: RsaKeys) -> None:
    async with start_proxy(jwks_cache_seconds=300, jwks_refetch_cooldown_seconds=COOLDOWN) as proxy:
        assert await proxy.statuses([proxy.token(key1)]) == [AUTHENTICATED]
        assert proxy.jwks.fetches() == 1
        # Within the cooldown: 20 concurrent unknown (well-formed) kids cause no fetch at all.
        unknown = [proxy.token(key1, kid=f"unknown-{i}") for i in range(20)]
        assert await proxy.statuses(unknown) == [UNAUTHENTICATED] * 20
        assert proxy.jwks.fetches() == 1
        # After the cooldown: 20 concurrent unknown kids cause at most one refetch between them.
        await asyncio.sleep(COOLDOWN + 0.1)
        unknown = [proxy.token(key1, kid=f"unknown-{i}") for i in range(20, 40)]
        assert await proxy.statuses(unknown) == [UNAUTHENTICATED] * 20
        assert proxy.jwks.fetches() <= 2
        # And the known key is unaffected.
        assert await proxy.statuses([proxy.token(key1)]) == [AUTHENTICATED]


async def test_unknown_kids_with_a_cold_cache_fetch_at_most_twice(
    start_proxy: StartProxy, key1: RsaKeys
) -> None:
    async with start_proxy(jwks_cache_seconds=300, jwks_refetch_cooldown_seconds=30) as proxy:
        unknown = [proxy.token(key1, kid=f"nope-{i}") for i in range(20)]
        assert await proxy.statuses(unknown) == [UNAUTHENTICATED] * 20
        assert 1 <= proxy.jwks.fetches() <= 2


async def test_unknown_kid_401_carries_the_challenge(start_proxy: StartProxy, key1: RsaKeys) -> None:
    async with start_proxy() as proxy, aiohttp.ClientSession() as http:
        status, headers, body = await proxy.post(proxy.token(key1, kid="unknown"), http)
        assert status == 401
        assert json.loads(body)["error"]["code"] == Unauthenticated.code
        assert headers.get("WWW-Authenticate", "").startswith('Bearer resource_metadata="')
        assert 'error="invalid_token"' in headers["WWW-Authenticate"]


async def test_malformed_kids_and_key_pointing_headers_never_fetch(
    start_proxy: StartProxy, key1: RsaKeys
) -> None:
    async with start_proxy(jwks_cache_seconds=300, jwks_refetch_cooldown_seconds=0) as proxy:
        tokens = [
            proxy.token(key1, kid="has space"),
            proxy.token(key1, kid="nul\x00kid"),
            proxy.token(key1, kid="k" * 300),
            proxy.token(key1, kid="k" * 10_240),
            proxy.token(key1, kid=""),
            proxy.token(key1, headers={"jku": proxy.jwks.evil_url}),
            proxy.token(key1, headers={"x5u": proxy.jwks.evil_url}),
            proxy.token(key1, headers={"jwk": key1.jwk()}),
        ]
        assert await proxy.statuses(tokens) == [UNAUTHENTICATED] * len(tokens)
        assert proxy.jwks.hits == []


async def test_last_good_keys_survive_the_endpoint_going_down(start_proxy: StartProxy, key1: RsaKeys) -> None:
    async with start_proxy(jwks_cache_seconds=0.3, jwks_refetch_cooldown_seconds=0.1) as proxy:
        assert await proxy.statuses([proxy.token(key1)]) == [AUTHENTICATED]
        await proxy.jwks.stop()
        await asyncio.sleep(0.5)  # the cached set has expired; every refresh now fails
        assert await proxy.statuses([proxy.token(key1) for _ in range(10)]) == [AUTHENTICATED] * 10
        await asyncio.sleep(0.5)
        assert await proxy.statuses([proxy.token(key1) for _ in range(5)]) == [AUTHENTICATED] * 5
        # Unknown kids during the outage are refused cleanly (401, not an error page).
        assert await proxy.statuses([proxy.token(key1, kid=f"x{i}") for i in range(10)]) == [401] * 10


async def test_last_good_keys_survive_an_http_error(start_proxy: StartProxy, key1: RsaKeys) -> None:
    async with start_proxy(jwks_cache_seconds=0.3, jwks_refetch_cooldown_seconds=0.1) as proxy:
        assert await proxy.statuses([proxy.token(key1)]) == [AUTHENTICATED]
        proxy.jwks.mode = "error"
        await asyncio.sleep(0.5)
        assert await proxy.statuses([proxy.token(key1) for _ in range(10)]) == [AUTHENTICATED] * 10
        assert proxy.jwks.fetches() <= 4  # one failed refresh per expiry, not one per request


async def test_last_good_keys_survive_a_slow_endpoint(start_proxy: StartProxy, key1: RsaKeys) -> None:
    async with start_proxy(
        jwks_cache_seconds=0.3, jwks_refetch_cooldown_seconds=0.1, jwks_timeout_seconds=0.3
    ) as proxy:
        assert await proxy.statuses([proxy.token(key1)]) == [AUTHENTICATED]
        proxy.jwks.mode = "slow"
        await asyncio.sleep(0.5)
        started = time.monotonic()
        assert await proxy.statuses([proxy.token(key1) for _ in range(10)]) == [AUTHENTICATED] * 10
        assert time.monotonic() - started < 2.5  # one timed-out refresh, not ten in a row


async def test_last_good_keys_survive_a_garbage_answer(start_proxy: StartProxy, key1: RsaKeys) -> None:
    async with start_proxy(jwks_cache_seconds=0.3, jwks_refetch_cooldown_seconds=0.1) as proxy:
        assert await proxy.statuses([proxy.token(key1)]) == [AUTHENTICATED]
        proxy.jwks.mode = "garbage"
        await asyncio.sleep(0.5)
        assert await proxy.statuses([proxy.token(key1) for _ in range(3)]) == [AUTHENTICATED] * 3


async def test_last_good_keys_survive_an_empty_key_set(start_proxy: StartProxy, key1: RsaKeys) -> None:
    async with start_proxy(jwks_cache_seconds=0.3, jwks_refetch_cooldown_seconds=0.1) as proxy:
        assert await proxy.statuses([proxy.token(key1)]) == [AUTHENTICATED]
        proxy.jwks.mode = "empty"
        await asyncio.sleep(0.5)
        assert await proxy.statuses([proxy.token(key1) for _ in range(3)]) == [AUTHENTICATED] * 3


async def test_endpoint_down_from_the_start_is_401_not_500(start_proxy: StartProxy, key1: RsaKeys) -> None:
    async with start_proxy() as proxy:
        await proxy.jwks.stop()
        assert await proxy.statuses([proxy.token(key1) for _ in range(3)]) == [UNAUTHENTICATED] * 3


async def test_a_rotated_key_is_picked_up_after_the_cooldown(
    start_proxy: StartProxy, key1: RsaKeys, key2: RsaKeys
) -> None:
    async with start_proxy(jwks_cache_seconds=300, jwks_refetch_cooldown_seconds=COOLDOWN) as proxy:
        assert await proxy.statuses([proxy.token(key1)]) == [AUTHENTICATED]
        proxy.jwks.keys = [key1.jwk(), key2.jwk()]
        # Within the cooldown the new kid is unknown and nothing is fetched.
        assert await proxy.statuses([proxy.token(key2)]) == [UNAUTHENTICATED]
        assert proxy.jwks.fetches() == 1
        await asyncio.sleep(COOLDOWN + 0.1)
        assert await proxy.statuses([proxy.token(key2) for _ in range(5)]) == [AUTHENTICATED] * 5
        assert proxy.jwks.fetches() == 2
        assert await proxy.statuses([proxy.token(key1), proxy.token(key2)]) == [AUTHENTICATED] * 2
        assert proxy.jwks.fetches() == 2


async def test_a_key_removed_from_the_set_stops_working_after_the_cache_expires(
    start_proxy: StartProxy, key1: RsaKeys, key2: RsaKeys
) -> None:
    proxy_keys = [key1.jwk(), key2.jwk()]
    async with start_proxy(jwks_cache_seconds=0.3, jwks_refetch_cooldown_seconds=0.1) as proxy:
        proxy.jwks.keys = proxy_keys
        assert await proxy.statuses([proxy.token(key1), proxy.token(key2)]) == [AUTHENTICATED] * 2
        proxy.jwks.keys = [key2.jwk()]
        await asyncio.sleep(0.5)
        assert await proxy.statuses([proxy.token(key2)]) == [AUTHENTICATED]
        assert await proxy.statuses([proxy.token(key1)]) == [UNAUTHENTICATED]


async def test_a_rotation_revokes_cached_tokens_of_the_old_key_at_the_refetch(
    start_proxy: StartProxy, key1: RsaKeys, key2: RsaKeys
) -> None:
    """A token verified (and cached) with key1 is refused as soon as the key set is fetched again
    without key1, although its cache entry had not expired yet."""
    async with start_proxy(jwks_cache_seconds=300, jwks_refetch_cooldown_seconds=0) as proxy:
        old = proxy.token(key1)
        assert await proxy.statuses([old, old]) == [AUTHENTICATED] * 2
        assert proxy.jwks.fetches() == 1
        assert proxy.verified_tokens() == 1
        proxy.jwks.keys = [key2.jwk()]  # rotated: key1 is gone
        assert await proxy.statuses([proxy.token(key2)]) == [AUTHENTICATED]  # an unknown kid: refetch
        assert proxy.jwks.fetches() == 2
        assert proxy.verified_tokens() == 1  # the old set's entries went with it
        assert await proxy.statuses([old]) == [UNAUTHENTICATED]
        assert await proxy.statuses([proxy.token(key2)]) == [AUTHENTICATED]


async def test_wrong_signature_with_a_known_kid_is_401(
    start_proxy: StartProxy, key1: RsaKeys, key2: RsaKeys
) -> None:
    async with start_proxy() as proxy:
        forged = proxy.token(key2, kid=key1.kid)  # signed with key2, claims to be kid-1
        assert await proxy.statuses([forged]) == [UNAUTHENTICATED]
        assert proxy.jwks.fetches() == 1


async def test_kid_of_a_key_of_another_type_is_401(start_proxy: StartProxy, key1: RsaKeys) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_jwk = {
        **json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key())),
        "kid": "ec-1",
        "use": "sig",
        "alg": "ES256",
    }
    async with start_proxy() as proxy:
        proxy.jwks.keys = [key1.jwk(), ec_jwk]
        assert await proxy.statuses([proxy.token(key1, kid="ec-1")]) == [UNAUTHENTICATED]
