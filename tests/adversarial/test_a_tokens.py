"""THREATS.md section A against the running proxy: each attack gets its status and a JSON-RPC error,
and neither tenant's upstream ever sees a request."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import pytest

from proxy.protocol.errors import BadRequest, Forbidden, ProxyError, Unauthenticated
from tests.adversarial.test_a_jwks import JWKS_ISS, JwksServer
from tests.conftest import MCP_ACCEPT, TENANTS, RunningProxy, StartProxy
from tests.factories import DEV_SECRET, RsaKeys, unsigned_token

pytestmark = pytest.mark.e2e

RSA_ISS = "https://rsa.idp.test"
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "attacker", "version": "1"},
    },
}
DROP: Any = object()


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def forge_hs256(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64url(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


@dataclass
class Forge:
    """Token builder bound to the running proxy (its URL is the audience) and its RSA issuer key."""

    url: str
    rsa: RsaKeys
    stranger: RsaKeys

    def claims(self, iss: str = "dev", **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        body: dict[str, Any] = {"iss": iss, "aud": self.url, "sub": "alice", "iat": now, "nbf": now}
        body["exp"] = now + 600
        if iss == RSA_ISS:
            body["org"] = {"id": "acme"}
        else:
            body["tenant"] = "acme"
        body.update(overrides)
        return {k: v for k, v in body.items() if v is not DROP}

    def dev(self, headers: dict[str, Any] | None = None, secret: str = DEV_SECRET, **claims: Any) -> str:
        return jwt.encode(self.claims(**{"iss": "dev", **claims}), secret, algorithm="HS256", headers=headers)

    def rsa_token(
        self, headers: dict[str, Any] | None = None, key: RsaKeys | None = None, **claims: Any
    ) -> str:
        signer = (key or self.rsa).private_pem
        return jwt.encode(
            self.claims(**{"iss": RSA_ISS, **claims}), signer, algorithm="RS256", headers=headers
        )


@pytest.fixture(scope="module")
def stranger_key() -> RsaKeys:
    return RsaKeys.generate("stranger")


@pytest.fixture
def forge(proxy: RunningProxy, rsa_keys: RsaKeys, stranger_key: RsaKeys) -> Forge:
    return Forge(proxy.url, rsa_keys, stranger_key)


@dataclass(frozen=True)
class Attack:
    authorization: Callable[[Forge], str | None]  # the Authorization header value (None: no header)
    status: int
    error: type[ProxyError]


def attack(id: str, authorization: Callable[[Forge], str | None], error: type[ProxyError]) -> Any:
    return pytest.param(Attack(authorization, error.status, error), id=id)


def bearer_of(make: Callable[[Forge], str]) -> Callable[[Forge], str]:
    return lambda f: f"Bearer {make(f)}"


def dev_with(**claims: Any) -> Callable[[Forge], str]:
    return bearer_of(lambda f: f.dev(**claims))


ATTACKS = [
    attack("no-token", lambda f: None, Unauthenticated),
    attack(
        "alg-none",
        bearer_of(lambda f: unsigned_token({"alg": "none", "typ": "JWT"}, f.claims())),
        Unauthenticated,
    ),
    attack("alg-NONE", bearer_of(lambda f: unsigned_token({"alg": "NONE"}, f.claims())), Unauthenticated),
    attack(
        "alg-none-rsa-issuer",
        bearer_of(lambda f: unsigned_token({"alg": "none"}, f.claims(RSA_ISS))),
        Unauthenticated,
    ),
    attack(
        "hs256-with-rsa-public-pem",
        bearer_of(lambda f: forge_hs256({"alg": "HS256"}, f.claims(RSA_ISS), f.rsa.public_pem)),
        Unauthenticated,
    ),
    attack(
        "hs256-with-public-jwk",
        bearer_of(
            lambda f: forge_hs256({"alg": "HS256"}, f.claims(RSA_ISS), json.dumps(f.rsa.jwk()).encode())
        ),
        Unauthenticated,
    ),
    attack(
        "kid-traversal-wrong-key",
        bearer_of(lambda f: f.rsa_token({"kid": "../../../../etc/passwd"}, key=f.stranger)),
        Unauthenticated,
    ),
    attack(
        "kid-url-wrong-key",
        bearer_of(lambda f: f.rsa_token({"kid": "http://attacker.example/k.pem"}, key=f.stranger)),
        Unauthenticated,
    ),
    attack("kid-10kb", bearer_of(lambda f: f.rsa_token({"kid": "k" * 10_240})), Unauthenticated),
    attack(
        "header-jku", bearer_of(lambda f: f.rsa_token({"jku": "http://127.0.0.1:1/jwks"})), Unauthenticated
    ),
    attack("header-x5u", bearer_of(lambda f: f.dev({"x5u": "http://127.0.0.1:1/cert"})), Unauthenticated),
    attack(
        "header-jwk",
        bearer_of(lambda f: f.rsa_token({"jwk": f.stranger.jwk()}, key=f.stranger)),
        Unauthenticated,
    ),
    attack("header-x5c", bearer_of(lambda f: f.dev({"x5c": ["MIIB"]})), Unauthenticated),
    attack("expired", dev_with(exp=int(time.time()) - 3600), Unauthenticated),
    attack("nbf-future", dev_with(nbf=int(time.time()) + 3600), Unauthenticated),
    attack("iat-future", dev_with(iat=int(time.time()) + 3600), Unauthenticated),
    attack("exp-missing", dev_with(exp=DROP), Unauthenticated),
    attack("exp-word", dev_with(exp="tomorrow"), Unauthenticated),
    attack("aud-wrong", dev_with(aud="http://127.0.0.1:8080/mcp"), Unauthenticated),
    attack("iss-wrong", dev_with(iss="https://evil.example"), Unauthenticated),
    attack("dev-secret-rsa-iss", dev_with(iss=RSA_ISS, org={"id": "acme"}), Unauthenticated),
    attack("rsa-key-dev-iss", bearer_of(lambda f: f.rsa_token(iss="dev", tenant="acme")), Unauthenticated),
    attack("stranger-rsa-key", bearer_of(lambda f: f.rsa_token(key=f.stranger)), Unauthenticated),
    attack("tenant-missing", dev_with(tenant=DROP), Forbidden),
    attack("tenant-empty", dev_with(tenant=""), Forbidden),
    attack("tenant-list", dev_with(tenant=["acme"]), Forbidden),
    attack("tenant-object", dev_with(tenant={"id": "acme"}), Forbidden),
    attack("tenant-number", dev_with(tenant=7), Forbidden),
    attack("tenant-ACME", dev_with(tenant="ACME"), Forbidden),
    attack("tenant-cyrillic-a", dev_with(tenant="\u0430cme"), Forbidden),
    attack("tenant-fullwidth", dev_with(tenant="\uff41\uff43\uff4d\uff45"), Forbidden),
    attack("tenant-trailing-space", dev_with(tenant="acme "), Forbidden),
    attack(
        "tenant-dotted-flat",
        bearer_of(lambda f: f.rsa_token(None, None, org=DROP, **{"org.id": "acme"})),
        Forbidden,
    ),
    attack("tenant-dotted-wrong-case", bearer_of(lambda f: f.rsa_token(org={"id": "Globex"})), Forbidden),
    attack("basic-scheme", lambda f: "Basic YWxpY2U6c2VjcmV0", Unauthenticated),
    attack("token-over-8192", bearer_of(lambda f: f.dev(pad="p" * 9000)), Unauthenticated),
    attack("two-tokens-one-header", lambda f: f"Bearer {f.dev()}, Bearer {f.dev()}", Unauthenticated),
]

METADATA_PATH = "/.well-known/oauth-protected-resource/mcp"


def assert_no_upstream_request(upstreams: dict[str, Any]) -> None:
    for tenant in TENANTS:
        seen = upstreams[tenant].recorder.snapshot()
        assert seen == [], f"{tenant} upstream received {[(r.method, r.text[:80]) for r in seen]}"


def assert_jsonrpc_error(body: bytes, error: type[ProxyError]) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(body)
    assert set(answer) == {"jsonrpc", "id", "error"}
    assert answer["jsonrpc"] == "2.0"
    assert answer["id"] is None
    assert answer["error"]["code"] == error.code
    assert isinstance(answer["error"]["message"], str)
    assert answer["error"]["message"]
    return answer


async def raw_post(url: str, headers: Any, body: Any = INITIALIZE) -> tuple[int, dict[str, str], bytes]:
    base = [("Accept", MCP_ACCEPT), ("Content-Type", "application/json")]
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, data=json.dumps(body).encode(), headers=[*base, *headers]) as response,
    ):
        return response.status, dict(response.headers), await response.read()


async def test_control_a_valid_token_reaches_its_upstream(
    proxy: RunningProxy, forge: Forge, upstreams: dict[str, Any]
) -> None:
    for token, tenant in ((forge.dev(), "acme"), (forge.rsa_token(org={"id": "globex"}), "globex")):
        status, headers, _ = await proxy.post(INITIALIZE, token=token)
        assert status == 200
        assert "Mcp-Session-Id" in headers
        assert upstreams[tenant].recorder.snapshot()


@pytest.mark.parametrize("case", ATTACKS)
async def test_token_attack(
    case: Attack, proxy: RunningProxy, forge: Forge, upstreams: dict[str, Any]
) -> None:
    authorization = case.authorization(forge)
    headers = {} if authorization is None else {"Authorization": authorization}
    status, response_headers, body = await proxy.post(INITIALIZE, headers=headers)
    assert status == case.status
    assert_jsonrpc_error(body, case.error)
    assert "Mcp-Session-Id" not in response_headers
    if authorization is not None:
        token = authorization.partition(" ")[2]
        assert token[:200].encode() not in body
    challenge = response_headers.get("WWW-Authenticate")
    if case.status == 401:
        assert challenge is not None
        expected = f'Bearer resource_metadata="{proxy.url.removesuffix("/mcp")}{METADATA_PATH}"'
        if authorization is None:
            assert challenge == expected
        else:
            assert re.fullmatch(
                re.escape(expected) + r', error="invalid_token", error_description="[^"]+"', challenge
            )
    else:
        assert challenge is None
    assert_no_upstream_request(upstreams)


# --- HTTP-level attacks -------------------------------------------------------------------------------


async def test_two_authorization_headers_are_400(
    proxy: RunningProxy, forge: Forge, upstreams: dict[str, Any]
) -> None:
    valid = f"Bearer {forge.dev()}"
    for pair in ((valid, valid), (valid, f"Bearer {forge.dev(tenant='globex')}"), (valid, "Basic eDp5")):
        status, _, body = await raw_post(proxy.url, [("Authorization", pair[0]), ("Authorization", pair[1])])
        assert status == 400
        assert_jsonrpc_error(body, BadRequest)
        assert b"more than one Authorization header" in body
    assert_no_upstream_request(upstreams)


async def test_64kb_authorization_header_is_refused_and_the_proxy_keeps_serving(
    proxy: RunningProxy, forge: Forge, upstreams: dict[str, Any]
) -> None:
    huge = "Bearer " + "A" * (64 * 1024)
    status, _, _ = await raw_post(proxy.url, [("Authorization", huge)])
    assert status in (400, 431)
    huge_token = "Bearer " + forge.dev(pad="p" * (64 * 1024))
    status, _, _ = await raw_post(proxy.url, [("Authorization", huge_token)])
    assert status in (400, 431)
    assert_no_upstream_request(upstreams)
    status, _, _ = await proxy.post(INITIALIZE, token=forge.dev())
    assert status == 200


async def test_64kb_authorization_header_gets_a_jsonrpc_error(proxy: RunningProxy) -> None:
    status, headers, body = await raw_post(proxy.url, [("Authorization", "Bearer " + "A" * (64 * 1024))])
    assert status in (400, 431)
    assert headers.get("Content-Type", "").startswith("application/json")
    assert_jsonrpc_error(body, BadRequest)
    assert b"AAAA" not in body


async def test_token_in_the_query_string_is_not_accepted(
    proxy: RunningProxy, forge: Forge, upstreams: dict[str, Any]
) -> None:
    token = forge.dev()
    for query in (f"access_token={token}", f"token={token}", f"authorization=Bearer%20{token}"):
        status, headers, body = await raw_post(f"{proxy.url}?{query}", [])
        assert status == 401
        assert_jsonrpc_error(body, Unauthenticated)
        assert headers["WWW-Authenticate"].startswith('Bearer resource_metadata="')
        assert 'error="invalid_token"' not in headers["WWW-Authenticate"]  # no token was *sent*
    assert_no_upstream_request(upstreams)


async def test_token_in_a_cookie_is_not_accepted(
    proxy: RunningProxy, forge: Forge, upstreams: dict[str, Any]
) -> None:
    token = forge.dev()
    for cookie in (f"access_token={token}", f"Authorization=Bearer {token}", f"token={token}"):
        status, _, body = await raw_post(proxy.url, [("Cookie", cookie)])
        assert status == 401
        assert_jsonrpc_error(body, Unauthenticated)
    assert_no_upstream_request(upstreams)


async def test_token_in_the_body_is_not_accepted(
    proxy: RunningProxy, forge: Forge, upstreams: dict[str, Any]
) -> None:
    body = {**INITIALIZE, "access_token": forge.dev()}
    status, _, answer = await raw_post(proxy.url, [], body)
    assert status == 401
    assert_jsonrpc_error(answer, Unauthenticated)
    assert_no_upstream_request(upstreams)


async def test_get_and_delete_need_a_token_too(proxy: RunningProxy, upstreams: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as http:
        for method, headers in (
            ("GET", {"Accept": "text/event-stream", "Mcp-Session-Id": "x" * 32}),
            ("DELETE", {"Mcp-Session-Id": "x" * 32}),
        ):
            async with http.request(method, proxy.url, headers=headers) as response:
                assert response.status == 401
                assert_jsonrpc_error(await response.read(), Unauthenticated)
    assert_no_upstream_request(upstreams)


# --- RFC 9728 metadata ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/.well-known/oauth-protected-resource", METADATA_PATH])
async def test_protected_resource_metadata(proxy: RunningProxy, path: str) -> None:
    origin = proxy.url.removesuffix("/mcp")
    async with aiohttp.ClientSession() as http, http.get(origin + path) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        document = await response.json()
    assert document["resource"] == proxy.url
    assert document["authorization_servers"] == ["https://idp.test"]
    assert document["bearer_methods_supported"] == ["header"]


async def test_the_challenge_points_at_a_working_metadata_document(proxy: RunningProxy) -> None:
    status, headers, _ = await proxy.post(INITIALIZE)
    assert status == 401
    match = re.match(r'Bearer resource_metadata="([^"]+)"', headers["WWW-Authenticate"])
    assert match is not None
    async with aiohttp.ClientSession() as http, http.get(match.group(1)) as response:
        assert response.status == 200
        assert (await response.json())["resource"] == proxy.url


@pytest.mark.parametrize(
    ("listen_path", "public_path", "served"),
    [
        ("/mcp/", "/mcp/", ["/mcp/", "/mcp"]),  # the documented literal <listen.path>, and without the slash
        ("/mcp", "/tenants/mcp", ["/mcp", "/tenants/mcp"]),  # a public path behind a rewriting ingress
    ],
)
async def test_metadata_is_served_at_every_path_form_the_proxy_advertises(
    make_proxy: StartProxy, upstreams: dict[str, Any], listen_path: str, public_path: str, served: list[str]
) -> None:
    public_url = f"https://mcp.example.test{public_path}"
    running = await make_proxy(upstreams, listen={"path": listen_path, "public_url": public_url})
    origin = f"http://127.0.0.1:{running.config.listen.port}"
    async with aiohttp.ClientSession() as http:
        for path in ["", *served]:
            async with http.get(f"{origin}/.well-known/oauth-protected-resource{path}") as response:
                assert response.status == 200, path
                assert (await response.json())["resource"] == public_url
        async with http.post(
            origin + listen_path, json=INITIALIZE, headers={"Accept": MCP_ACCEPT}
        ) as response:
            assert response.status == 401
            challenge = response.headers["WWW-Authenticate"]
    assert challenge == (
        f'Bearer resource_metadata="https://mcp.example.test/.well-known/oauth-protected-resource'
        f'{public_path.rstrip("/")}"'
    )


# --- A5-A9: a kid never opens a file or a connection ----------------------------------------------------

# Audit events (PEP 578) that reading a file or reaching the network cannot avoid.
WATCHED_EVENTS = frozenset(
    {
        "open",
        "os.listdir",
        "os.scandir",
        "socket.connect",
        "socket.getaddrinfo",
        "socket.gethostbyname",
        "urllib.Request",
        "http.client.connect",
        "subprocess.Popen",
        "os.system",
        "sqlite3.connect",
    }
)
_recording: list[list[tuple[str, str, str]]] = []  # the events of the `watching()` block running now


def _audit_hook(event: str, args: tuple[Any, ...]) -> None:
    if _recording and event in WATCHED_EVENTS:
        _recording[-1].append((event, repr(args)[:200], threading.current_thread().name))


_hook_installed: list[bool] = []


@contextlib.contextmanager
def watching() -> Iterator[list[tuple[str, str, str]]]:
    """Every file open and network access of the process (any thread) while the block runs.

    sys.addaudithook cannot be undone: the hook is installed once and does nothing outside a block.
    """
    if not _hook_installed:
        sys.addaudithook(_audit_hook)
        _hook_installed.append(True)
    events: list[tuple[str, str, str]] = []
    _recording.append(events)
    try:
        yield events
    finally:
        _recording.remove(events)


WEIRD_KIDS = {
    "traversal": "../../../../etc/passwd",
    "absolute-path": "/etc/passwd",
    "encoded-traversal": "..%2f..%2f..%2fetc%2fpasswd",
    "proc-self": "/proc/self/environ",
    "nul": "key\x00../../etc/passwd",
    "sql": "' OR '1'='1' --",
    "sql-no-spaces": "1;DROP/**/TABLE/**/keys--",
    "url": "http://127.0.0.1:9/k.pem",
    "file-url": "file:///etc/passwd",
    "10kb": "k" * 10_240,
    "newline": "kid\n../etc/passwd",
    "non-ascii": "ключ",
}
# What the JWKS issuer refuses before any lookup (kid shape: 1-256 printable ASCII, no space).
MALFORMED_FOR_JWKS = {"nul", "sql", "10kb", "newline", "non-ascii"}


@pytest.fixture
async def auth_issuers(
    tmp_path: Any, rsa_keys: RsaKeys, stranger_key: RsaKeys
) -> AsyncIterator[tuple[Any, Any, JwksServer]]:
    """A config with the three issuer kinds (HS256 secret, RS256 PEM file, RS256 JWKS URL) and the
    JWKS endpoint it names."""
    from proxy.config import ProxyConfig
    from tests.conftest import proxy_config

    jwks = JwksServer([rsa_keys.jwk()])
    await jwks.start()
    url = "http://127.0.0.1:8080/mcp"
    data = proxy_config(url, dict.fromkeys(TENANTS, "http://127.0.0.1:9/mcp"), tmp_path, rsa_keys)
    data["auth"]["issuers"].append(
        {
            "issuer": JWKS_ISS,
            "audiences": [url],
            "algorithms": ["RS256"],
            "jwks_url": jwks.url,
            "tenant_claim": "tenant",
            "jwks_refetch_cooldown_seconds": 300,
            "jwks_cache_seconds": 300,
        }
    )
    try:
        yield ProxyConfig.model_validate(data, context={}), Forge(url, rsa_keys, stranger_key), jwks
    finally:
        await jwks.stop()


async def outcome(authenticator: Any, token: str) -> str:
    try:
        ctx = await authenticator.authenticate([f"Bearer {token}"])
    except Unauthenticated:
        return "401"
    return f"ok:{ctx.tenant}"


def jwks_token(forge: Forge, kid: Any) -> str:
    claims = forge.claims(iss=JWKS_ISS, tenant="acme")
    return jwt.encode(claims, forge.rsa.private_pem, algorithm="RS256", headers={"kid": kid})


async def test_control_the_watch_sees_key_files_and_jwks_fetches(
    auth_issuers: tuple[Any, Any, JwksServer], rsa_keys: RsaKeys
) -> None:
    """Without this the other kid tests could pass by seeing nothing at all: loading the PEM file,
    and fetching the key set for a well-formed kid (from a worker thread), are both recorded."""
    from proxy.layers.auth.authenticator import Authenticator

    config, forge, jwks = auth_issuers
    with watching() as events:
        authenticator = Authenticator(config)
    assert any(e == "open" and "rsa.pem" in args for e, args, _ in events), events
    with watching() as events:
        assert await outcome(authenticator, jwks_token(forge, rsa_keys.kid)) == "ok:acme"
    assert any(e == "socket.connect" and str(jwks.port) in args for e, args, _ in events), events
    assert jwks.fetches() == 1


@pytest.mark.parametrize("kid", list(WEIRD_KIDS), ids=list(WEIRD_KIDS))
async def test_a_weird_kid_opens_no_file_and_no_connection(
    auth_issuers: tuple[Any, Any, JwksServer], rsa_keys: RsaKeys, kid: str
) -> None:
    from proxy.layers.auth.authenticator import Authenticator

    config, forge, jwks = auth_issuers
    value = WEIRD_KIDS[kid]
    warm = Authenticator(config)  # built (its PEM file read) and its key set fetched beforehand
    assert await outcome(warm, jwks_token(forge, rsa_keys.kid)) == "ok:acme"
    cold = Authenticator(config)  # a JWKS issuer that has fetched nothing yet
    hits_before = list(jwks.hits)
    headers = {"kid": value}
    # Static-key issuers never look the kid up: signed with their key, the token is accepted (unless
    # the kid makes it longer than the 8192 characters any token may have); with another, refused.
    accepted = "401" if kid == "10kb" else "ok:acme"
    cases = [
        (warm, forge.dev(headers), accepted),
        (warm, forge.dev(headers, secret="another-secret-0123456789-abcdefghij"), "401"),
        (warm, forge.rsa_token(headers), accepted),
        (warm, forge.rsa_token(headers, key=forge.stranger), "401"),
        # The JWKS issuer has no such key: refused, from its cached set.
        (warm, jwks_token(forge, value), "401"),
    ]
    if kid in MALFORMED_FOR_JWKS:  # refused for its shape, before any lookup, even with a cold cache
        cases.append((cold, jwks_token(forge, value), "401"))
    with watching() as events:
        outcomes = [await outcome(authenticator, token) for authenticator, token, _ in cases]
    assert outcomes == [expected for _, _, expected in cases]
    assert events == [], f"kid {value[:40]!r} caused {events}"
    assert jwks.hits == hits_before
    if kid not in MALFORMED_FOR_JWKS:
        # A well-formed kid the cold JWKS issuer does not know makes it fetch its configured key set
        # (once): that URL and nothing else, whatever the kid names; still no file.
        with watching() as events:
            assert await outcome(cold, jwks_token(forge, value)) == "401"
        assert jwks.hits == [*hits_before, "/jwks.json"]
        assert {e for e, _, _ in events} <= {"urllib.Request", "http.client.connect", "socket.getaddrinfo",
                                             "socket.connect"}  # fmt: skip
        assert all(jwks.url in args or str(jwks.port) in args for _, args, _ in events), events
