"""Authenticator without sockets: THREATS.md section A token attacks, table-driven.

Every row names the Authorization header values sent and the exact outcome: a TenantContext for
acme/alice, or the exception class (Unauthenticated -> 401, Forbidden -> 403, BadRequest -> 400,
InsufficientScope -> 403). For 401s the WWW-Authenticate value is checked too. JWKS fetches are
counted through a stand-in for PyJWKClient.fetch_data, so "no outbound request" is asserted.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import random
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from jwt import PyJWKClient

from proxy.config import ConfigError, ProxyConfig
from proxy.layers.auth.authenticator import (
    MAX_TOKEN_CHARS,
    Authenticator,
    hmac_secret_problem,
    metadata_url,
    mint_token,
)
from proxy.protocol.errors import BadRequest, Forbidden, InsufficientScope, ProxyError, Unauthenticated
from proxy.types import TenantContext
from tests.factories import DEV_SECRET, DEV_SECRET_ENV, RESOURCE, RsaKeys, make_config, unsigned_token

OTHER_SECRET_ENV = "MCP_PROXY_TEST_OTHER_SECRET"
OTHER_SECRET = "nVSkjQcadEc63gL5oMTVzu3q22ur0ORCMmVmzjpyTQQ"  # secrets.token_urlsafe(32), fixed
RSA_ISS = "https://rsa.idp.test"
JWKS_ISS = "https://jwks.idp.test"
MIXED_ISS = "https://mixed.idp.test"
JWKS_URL = "http://127.0.0.1:9/.well-known/jwks.json"
ENV = {DEV_SECRET_ENV: DEV_SECRET, OTHER_SECRET_ENV: OTHER_SECRET}
METADATA = "http://127.0.0.1:8080/.well-known/oauth-protected-resource/mcp"
CHALLENGE_401 = re.compile(
    rf'^Bearer resource_metadata="{re.escape(METADATA)}", error="invalid_token", '
    r'error_description="[^"\\\r\n]+"$'
)
CHALLENGE_NO_TOKEN = f'Bearer resource_metadata="{METADATA}"'


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def forge_hs256(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    """HS256 by hand: pyjwt refuses PEM-looking HMAC secrets, an attacker's code does not."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


@functools.cache
def private_key(private_pem: bytes) -> rsa.RSAPrivateKey:
    """Loading (and checking) an RSA key takes tens of ms: once per key, not once per token."""
    key = serialization.load_pem_private_key(private_pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def sign_rs256(header: dict[str, Any], claims: dict[str, Any], private_pem: bytes) -> str:
    """RS256 with an arbitrary header (pyjwt.encode refuses e.g. a non-string kid)."""
    key = private_key(private_pem)
    signing_input = (
        f"{b64url(json.dumps({'alg': 'RS256', **header}).encode())}.{b64url(json.dumps(claims).encode())}"
    )
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


@dataclass
class Keys:
    rsa: RsaKeys  # the RSA issuer's public_key_file
    jwks: RsaKeys  # served by the JWKS issuer's (fake) endpoint
    stranger: RsaKeys  # configured nowhere
    ec_private: ec.EllipticCurvePrivateKey

    def claims(self, iss: Any = "dev", **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": iss,
            "aud": RESOURCE,
            "sub": "alice",
            "iat": now,
            "nbf": now,
            "exp": now + 600,
        }
        if iss == RSA_ISS:
            body["org"] = {"id": "acme"}
        else:
            body["tenant"] = "acme"
        body.update(overrides)
        return {k: v for k, v in body.items() if v is not DROP}

    def dev(self, headers: dict[str, Any] | None = None, secret: str = DEV_SECRET, **claims: Any) -> str:
        return jwt.encode(self.claims(**{"iss": "dev", **claims}), secret, algorithm="HS256", headers=headers)

    def rsa_token(
        self,
        headers: dict[str, Any] | None = None,
        key: RsaKeys | None = None,
        iss: str = RSA_ISS,
        **claims: Any,
    ) -> str:
        signer = key or self.rsa
        return jwt.encode(
            self.claims(iss, **claims), private_key(signer.private_pem), algorithm="RS256", headers=headers
        )

    def jwks_token(self, kid: Any = "jwks-1", key: RsaKeys | None = None, **claims: Any) -> str:
        headers = {} if kid is DROP else {"kid": kid}
        return sign_rs256(headers, self.claims(JWKS_ISS, **claims), (key or self.jwks).private_pem)


DROP: Any = object()  # a claim value meaning "leave this claim out"


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        RsaKeys.generate("rsa-1"),
        RsaKeys.generate("jwks-1"),
        RsaKeys.generate("stranger"),
        ec.generate_private_key(ec.SECP256R1()),
    )


def ec_jwk(private: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    return {**jwk, "kid": kid, "use": "sig", "alg": "ES256"}


class FakeJwksEndpoint:
    """Stands in for the network behind PyJWKClient.fetch_data; counts every fetch and its URL."""

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.keys = keys
        self.fetched: list[str] = []

    def fetch_data(self, client: PyJWKClient) -> Any:
        self.fetched.append(client.uri)
        data = {"keys": list(self.keys)}
        if client.jwk_set_cache is not None:
            client.jwk_set_cache.put(data)
        client._last_successful_fetch = time.monotonic()
        return data


@pytest.fixture
def jwks(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> FakeJwksEndpoint:
    endpoint = FakeJwksEndpoint([keys.jwks.jwk(), ec_jwk(keys.ec_private, "ec-1")])
    monkeypatch.setattr(PyJWKClient, "fetch_data", lambda client: endpoint.fetch_data(client))
    return endpoint


def issuers(rsa_pem: Path) -> list[dict[str, Any]]:
    return [
        {
            "issuer": "dev",
            "audiences": [RESOURCE],
            "algorithms": ["HS256"],
            "secret_env": DEV_SECRET_ENV,
            "tenant_claim": "tenant",
        },
        {
            "issuer": "dev2",
            "audiences": [RESOURCE],
            "algorithms": ["HS256"],
            "secret_env": OTHER_SECRET_ENV,
            "tenant_claim": "tenant",
        },
        {
            "issuer": RSA_ISS,
            "audiences": [RESOURCE],
            "algorithms": ["RS256"],
            "public_key_file": str(rsa_pem),
            "tenant_claim": "org.id",
        },
        {
            "issuer": JWKS_ISS,
            "audiences": [RESOURCE],
            "algorithms": ["RS256"],
            "jwks_url": JWKS_URL,
            "tenant_claim": "tenant",
            "jwks_refetch_cooldown_seconds": 30,
        },
        {
            "issuer": MIXED_ISS,
            "audiences": [RESOURCE],
            "algorithms": ["RS256", "ES256"],
            "public_key_file": str(rsa_pem),
            "tenant_claim": "tenant",
        },
        {
            "issuer": "scoped",
            "audiences": [RESOURCE],
            "algorithms": ["HS256"],
            "secret_env": DEV_SECRET_ENV,
            "tenant_claim": "tenant",
            "required_scopes": ["notes:read", "notes:write"],
        },
    ]


@pytest.fixture
def config(keys: Keys, tmp_path: Path) -> ProxyConfig:
    pem = tmp_path / "rsa.pem"
    pem.write_bytes(keys.rsa.public_pem)
    return make_config(issuers=issuers(pem))


@pytest.fixture
def auth(config: ProxyConfig, jwks: FakeJwksEndpoint) -> Authenticator:
    return Authenticator(config, env=ENV)


def bearer(token: str) -> list[str]:
    return [f"Bearer {token}"]


OK: Any = "ok"


@dataclass(frozen=True)
class Case:
    make: Callable[[Keys], list[str]]
    expect: Any  # OK, or the exact ProxyError subclass
    fetches: int = 0  # JWKS fetches allowed (at most)


def case(id: str, make: Callable[[Keys], list[str]], expect: Any, fetches: int = 0, **marks: Any) -> Any:
    return pytest.param(Case(make, expect, fetches), id=id, **marks)


def now(offset: int, render: Callable[[int], Any] = int) -> Callable[[], Any]:
    """A time claim computed when the token is made, not when the table is imported."""
    return lambda: render(int(time.time()) + offset)


def _resolve(claims: dict[str, Any]) -> dict[str, Any]:
    return {name: value() if callable(value) else value for name, value in claims.items()}


def claims_token(**claims: Any) -> Callable[[Keys], list[str]]:
    return lambda k: bearer(k.dev(**_resolve(claims)))


def rsa_claims_token(**claims: Any) -> Callable[[Keys], list[str]]:
    return lambda k: bearer(k.rsa_token(**_resolve(claims)))


def alg_token(alg: str) -> Callable[[Keys], list[str]]:
    return lambda k: bearer(unsigned_token({"alg": alg, "typ": "JWT"}, k.claims()))


def dev_with_headers(headers: dict[str, Any]) -> Callable[[Keys], list[str]]:
    return lambda k: bearer(k.dev(headers))


def rsa_with_headers(headers: dict[str, Any], stranger: bool = False) -> Callable[[Keys], list[str]]:
    return lambda k: bearer(k.rsa_token(headers, key=k.stranger if stranger else None))


KEY_POINTING_HEADERS: dict[str, dict[str, Any]] = {
    "jku": {"jku": "https://attacker.example/jwks.json"},
    "x5u": {"x5u": "https://attacker.example/cert.pem"},
    "jwk": {"jwk": {"kty": "oct", "k": b64url(b"attacker")}},
    "x5c": {"x5c": ["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"]},
}
WEIRD_KIDS = {
    "traversal": "../../../../etc/passwd",
    "sql": "' OR 1=1; DROP TABLE keys; --",
    "url": "http://attacker.example/key.pem",
    "nul": "key\x00../../etc/passwd",
}
TEN_KB_KID = "k" * 10_240
FULLWIDTH_ACME = "\uff41\uff43\uff4d\uff45"
CYRILLIC_ACME = "\u0430cme"

TABLE = [
    # --- control rows: the table can tell right from wrong -----------------------------------------
    case("valid-hs256", lambda k: bearer(k.dev()), OK),
    case("valid-rs256-dotted-claim", lambda k: bearer(k.rsa_token()), OK),
    case("valid-jwks", lambda k: bearer(k.jwks_token()), OK, fetches=1),
    case("scheme-lowercase", lambda k: [f"bearer {k.dev()}"], OK),
    case("extra-spaces", lambda k: [f"  Bearer   {k.dev()}  "], OK),
    case("exp-within-leeway", claims_token(exp=now(-5)), OK),
    case("aud-list-containing-ours", claims_token(aud=["https://other.example", RESOURCE]), OK),
    # --- alg none -------------------------------------------------------------------------------------
    *[
        case(
            f"alg-{alg}",
            alg_token(alg),
            Unauthenticated,
        )
        for alg in ("none", "None", "NONE", "nOnE")
    ],
    case(
        "alg-none-rsa-issuer",
        lambda k: bearer(unsigned_token({"alg": "none"}, k.claims(RSA_ISS))),
        Unauthenticated,
    ),
    case(
        "alg-none-jwks-issuer-no-fetch",
        lambda k: bearer(unsigned_token({"alg": "none", "kid": "jwks-1"}, k.claims(JWKS_ISS))),
        Unauthenticated,
    ),
    case(
        "alg-none-with-a-signature",
        lambda k: bearer(unsigned_token({"alg": "none"}, k.claims()) + "c2ln"),
        Unauthenticated,
    ),
    case(
        "alg-missing", lambda k: bearer(unsigned_token({"typ": "JWT"}, k.claims()) + "c2ln"), Unauthenticated
    ),
    case(
        "alg-not-a-string",
        lambda k: bearer(forge_hs256({"alg": ["HS256"]}, k.claims(), DEV_SECRET.encode())),
        Unauthenticated,
    ),
    # --- HS256 with public key material (algorithm confusion) ----------------------------------------
    case(
        "hs256-with-rsa-public-pem",
        lambda k: bearer(forge_hs256({"alg": "HS256", "typ": "JWT"}, k.claims(RSA_ISS), k.rsa.public_pem)),
        Unauthenticated,
    ),
    case(
        "hs256-with-rsa-public-pem-claiming-rs256",
        lambda k: bearer(forge_hs256({"alg": "RS256"}, k.claims(RSA_ISS), k.rsa.public_pem)),
        Unauthenticated,
    ),
    case(
        "hs256-with-public-jwk-json",
        lambda k: bearer(forge_hs256({"alg": "HS256"}, k.claims(RSA_ISS), json.dumps(k.rsa.jwk()).encode())),
        Unauthenticated,
    ),
    case(
        "hs256-with-jwks-public-jwk-no-fetch",
        lambda k: bearer(
            forge_hs256(
                {"alg": "HS256", "kid": "jwks-1"}, k.claims(JWKS_ISS), json.dumps(k.jwks.jwk()).encode()
            )
        ),
        Unauthenticated,
    ),
    case(
        "hs256-with-jwks-public-pem-no-fetch",
        lambda k: bearer(
            forge_hs256({"alg": "HS256", "kid": "jwks-1"}, k.claims(JWKS_ISS), k.jwks.public_pem)
        ),
        Unauthenticated,
    ),
    # --- kid on static-key issuers: never used to find a key ----------------------------------------
    *[
        case(f"kid-{name}-static-rsa-right-key", rsa_with_headers({"kid": kid}), OK)
        for name, kid in WEIRD_KIDS.items()
    ],
    *[
        case(f"kid-{name}-static-hs-right-key", dev_with_headers({"kid": kid}), OK)
        for name, kid in WEIRD_KIDS.items()
    ],
    *[
        case(
            f"kid-{name}-static-rsa-wrong-key",
            rsa_with_headers({"kid": kid}, stranger=True),
            Unauthenticated,
        )
        for name, kid in WEIRD_KIDS.items()
    ],
    case("kid-10kb-static-rsa", lambda k: bearer(k.rsa_token({"kid": TEN_KB_KID})), Unauthenticated),
    case("kid-10kb-static-hs", lambda k: bearer(k.dev({"kid": TEN_KB_KID})), Unauthenticated),
    # --- kid on the JWKS issuer: malformed -> refused before any fetch -------------------------------
    case("jwks-kid-missing", lambda k: bearer(k.jwks_token(kid=DROP)), Unauthenticated),
    case("jwks-kid-empty", lambda k: bearer(k.jwks_token(kid="")), Unauthenticated),
    case("jwks-kid-number", lambda k: bearer(k.jwks_token(kid=1)), Unauthenticated),
    case("jwks-kid-list", lambda k: bearer(k.jwks_token(kid=["jwks-1"])), Unauthenticated),
    case("jwks-kid-nul", lambda k: bearer(k.jwks_token(kid=WEIRD_KIDS["nul"])), Unauthenticated),
    case("jwks-kid-sql-with-spaces", lambda k: bearer(k.jwks_token(kid=WEIRD_KIDS["sql"])), Unauthenticated),
    case("jwks-kid-non-ascii", lambda k: bearer(k.jwks_token(kid="jwks-\u0131")), Unauthenticated),
    case("jwks-kid-300-chars", lambda k: bearer(k.jwks_token(kid="k" * 300)), Unauthenticated),
    case("jwks-kid-10kb", lambda k: bearer(k.jwks_token(kid=TEN_KB_KID)), Unauthenticated),
    # Well-formed but unknown kids are opaque lookups: at most the one (initial) fetch, of jwks_url only.
    case(
        "jwks-kid-traversal",
        lambda k: bearer(k.jwks_token(kid=WEIRD_KIDS["traversal"])),
        Unauthenticated,
        1,
    ),
    case(
        "jwks-kid-url",
        lambda k: bearer(k.jwks_token(kid=WEIRD_KIDS["url"])),
        Unauthenticated,
        1,
    ),
    case(
        "jwks-known-kid-wrong-key",
        lambda k: bearer(k.jwks_token(key=k.stranger)),
        Unauthenticated,
        1,
    ),
    # --- key-pointing headers: refused even on an otherwise valid token -----------------------------
    *[
        case(f"header-{name}-hs", dev_with_headers(header), Unauthenticated)
        for name, header in KEY_POINTING_HEADERS.items()
    ],
    case(
        "header-jwk-rsa-self-signed",
        lambda k: bearer(k.rsa_token({"jwk": k.stranger.jwk()}, key=k.stranger)),
        Unauthenticated,
    ),
    case(
        "header-jku-rsa-valid",
        lambda k: bearer(k.rsa_token({"jku": "https://attacker.example/j"})),
        Unauthenticated,
    ),
    case(
        "header-jku-jwks-no-fetch",
        lambda k: bearer(
            k.rsa_token({"kid": "jwks-1", "jku": "https://attacker.example/j"}, key=k.jwks, iss=JWKS_ISS)
        ),
        Unauthenticated,
    ),
    case(
        "header-x5u-jwks-no-fetch",
        lambda k: bearer(
            k.rsa_token({"kid": "jwks-1", "x5u": "https://attacker.example/c"}, key=k.jwks, iss=JWKS_ISS)
        ),
        Unauthenticated,
    ),
    # --- time claims ---------------------------------------------------------------------------------
    case("expired", claims_token(exp=now(-3600)), Unauthenticated),
    case("expired-rsa", rsa_claims_token(exp=now(-3600)), Unauthenticated),
    case("nbf-in-future", claims_token(nbf=now(3600)), Unauthenticated),
    case("iat-in-future", claims_token(iat=now(3600)), Unauthenticated),
    case("exp-missing", claims_token(exp=DROP), Unauthenticated),
    case("exp-null", claims_token(exp=None), Unauthenticated),
    case("exp-non-numeric-string", claims_token(exp="tomorrow"), Unauthenticated),
    case(
        "exp-numeric-string",
        claims_token(exp=now(600, str)),
        Unauthenticated,
    ),
    case("exp-list", claims_token(exp=now(600, lambda t: [t])), Unauthenticated),
    case("nbf-string", claims_token(nbf="soon"), Unauthenticated),
    # --- aud / iss --------------------------------------------------------------------------------
    case("aud-wrong", claims_token(aud="https://other.example/mcp"), Unauthenticated),
    case("aud-prefix", claims_token(aud=RESOURCE + "/extra"), Unauthenticated),
    case("aud-missing", claims_token(aud=DROP), Unauthenticated),
    case("aud-rsa-wrong", rsa_claims_token(aud="https://other.example/mcp"), Unauthenticated),
    case("iss-unknown", claims_token(iss="https://evil.example"), Unauthenticated),
    case("iss-missing", claims_token(iss=DROP), Unauthenticated),
    case(
        "iss-list",
        lambda k: bearer(forge_hs256({"alg": "HS256"}, k.claims(iss=["dev"]), DEV_SECRET.encode())),
        Unauthenticated,
    ),
    case("iss-case-variant", claims_token(iss="DEV"), Unauthenticated),
    case("issuer-a-secret-with-issuer-b-iss", claims_token(iss="dev2"), Unauthenticated),
    case("issuer-b-secret-with-issuer-a-iss", lambda k: bearer(k.dev(secret=OTHER_SECRET)), Unauthenticated),
    case("rsa-key-with-dev-iss", lambda k: bearer(k.rsa_token(iss="dev", tenant="acme")), Unauthenticated),
    case(
        "dev-secret-with-rsa-iss", lambda k: bearer(k.dev(iss=RSA_ISS, org={"id": "acme"})), Unauthenticated
    ),
    case(
        "rsa-key-with-jwks-iss",
        lambda k: bearer(k.rsa_token({"kid": "jwks-1"}, iss=JWKS_ISS, tenant="acme")),
        Unauthenticated,
        1,
    ),
    case("jwks-key-with-rsa-iss", lambda k: bearer(k.rsa_token(key=k.jwks)), Unauthenticated),
    case("stranger-rsa-key", lambda k: bearer(k.rsa_token(key=k.stranger)), Unauthenticated),
    # --- subject -----------------------------------------------------------------------------------
    case("sub-missing", claims_token(sub=DROP), Unauthenticated),
    case("sub-empty", claims_token(sub=""), Unauthenticated),
    case("sub-number", claims_token(sub=42), Unauthenticated),
    # --- tenant claim: anything but an exact configured id is 403 ----------------------------------
    case("tenant-missing", claims_token(tenant=DROP), Forbidden),
    case("tenant-empty", claims_token(tenant=""), Forbidden),
    case("tenant-null", claims_token(tenant=None), Forbidden),
    case("tenant-list", claims_token(tenant=["acme"]), Forbidden),
    case("tenant-object", claims_token(tenant={"id": "acme"}), Forbidden),
    case("tenant-number", claims_token(tenant=1), Forbidden),
    case("tenant-bool", claims_token(tenant=True), Forbidden),
    case("tenant-uppercase", claims_token(tenant="ACME"), Forbidden),
    case("tenant-titlecase", claims_token(tenant="Acme"), Forbidden),
    case("tenant-cyrillic-a", claims_token(tenant=CYRILLIC_ACME), Forbidden),
    case("tenant-fullwidth", claims_token(tenant=FULLWIDTH_ACME), Forbidden),
    case("tenant-trailing-space", claims_token(tenant="acme "), Forbidden),
    case("tenant-leading-space", claims_token(tenant=" acme"), Forbidden),
    case("tenant-trailing-newline", claims_token(tenant="acme\n"), Forbidden),
    case("tenant-nul", claims_token(tenant="acme\x00"), Forbidden),
    case("tenant-zero-width", claims_token(tenant="ac\u200bme"), Forbidden),
    case("tenant-unknown", claims_token(tenant="initech"), Forbidden),
    case("tenant-dotted-flat-key", rsa_claims_token(org=DROP, **{"org.id": "acme"}), Forbidden),
    case("tenant-dotted-parent-is-string", rsa_claims_token(org="acme"), Forbidden),
    case("tenant-dotted-leaf-list", rsa_claims_token(org={"id": ["acme"]}), Forbidden),
    case("tenant-dotted-parent-list", rsa_claims_token(org=[{"id": "acme"}]), Forbidden),
    case("tenant-dotted-case-variant", rsa_claims_token(org={"id": "ACME"}), Forbidden),
    case("tenant-dotted-top-level-only", rsa_claims_token(org=DROP, tenant="acme"), Forbidden),
    # --- the Authorization header itself -----------------------------------------------------------
    case("no-authorization", lambda k: [], Unauthenticated),
    case("two-authorization-headers", lambda k: [*bearer(k.dev()), *bearer(k.dev())], BadRequest),
    case("two-authorization-one-bad", lambda k: [*bearer(k.dev()), "Basic eDp5"], BadRequest),
    case("basic-scheme", lambda k: ["Basic YWxpY2U6cGFzc3dvcmQ="], Unauthenticated),
    case("token-scheme", lambda k: [f"Token {k.dev()}"], Unauthenticated),
    case("raw-token-no-scheme", lambda k: [k.dev()], Unauthenticated),
    case("bearer-without-token", lambda k: ["Bearer"], Unauthenticated),
    case("bearer-blank-token", lambda k: ["Bearer    "], Unauthenticated),
    case("bearer-two-tokens", lambda k: [f"Bearer {k.dev()} {k.dev()}"], Unauthenticated),
    case("token-over-8192-chars", lambda k: bearer(k.dev(padding="p" * MAX_TOKEN_CHARS)), Unauthenticated),
    case("token-with-base64-padding", lambda k: bearer(k.dev() + "="), Unauthenticated),
    case("token-jwe-five-parts", lambda k: bearer(k.dev() + ".a.b"), Unauthenticated),
    case("token-garbage", lambda k: bearer("a.b.c"), Unauthenticated),
    case(
        "token-non-json-header",
        lambda k: bearer(b64url(b"not json") + "." + b64url(b"{}") + ".sig"),
        Unauthenticated,
    ),
    case(
        "token-array-payload",
        lambda k: bearer(b64url(b'{"alg":"HS256"}') + "." + b64url(b"[]") + ".sig"),
        Unauthenticated,
    ),
    # --- scopes ----------------------------------------------------------------------------------------
    case("scopes-missing", claims_token(iss="scoped"), InsufficientScope),
    case("scopes-partial", claims_token(iss="scoped", scope="notes:read"), InsufficientScope),
    case(
        "scopes-wrong-type",
        claims_token(iss="scoped", scope=["notes:read", "notes:write"]),
        InsufficientScope,
    ),
    case("scopes-present", claims_token(iss="scoped", scope="notes:write other notes:read"), OK),
    case("scopes-scp-list", claims_token(iss="scoped", scp=["notes:read", "notes:write"]), OK),
]


@pytest.mark.parametrize("row", TABLE)
async def test_token_attack_table(row: Case, auth: Authenticator, keys: Keys, jwks: FakeJwksEndpoint) -> None:
    authorization = row.make(keys)
    if row.expect is OK:
        result = await auth.authenticate(authorization)
        assert isinstance(result, TenantContext)
        assert (result.tenant, result.subject) == ("acme", "alice")
    else:
        with pytest.raises(ProxyError) as info:
            await auth.authenticate(authorization)
        error = info.value
        assert type(error) is row.expect, f"{type(error).__name__}: {error.message}"
        expected_status = {Unauthenticated: 401, Forbidden: 403, InsufficientScope: 403, BadRequest: 400}
        assert error.status == expected_status[row.expect]
        challenge = error.headers.get("WWW-Authenticate")
        if row.expect is Unauthenticated:
            assert challenge is not None
            if authorization:
                assert CHALLENGE_401.fullmatch(challenge), challenge
            else:
                assert challenge == CHALLENGE_NO_TOKEN
        elif row.expect is InsufficientScope:
            assert challenge == (
                f'Bearer resource_metadata="{METADATA}", error="insufficient_scope", '
                'scope="notes:read notes:write"'
            )
        else:
            assert challenge is None
    assert len(jwks.fetched) <= row.fetches
    assert set(jwks.fetched) <= {JWKS_URL}


# --- findings: exceptions that escape as 500s --------------------------------------------------------


async def test_alg_of_another_key_family_is_401_not_a_crash(auth: Authenticator, keys: Keys) -> None:
    token = jwt.encode(keys.claims(MIXED_ISS), keys.ec_private, algorithm="ES256")
    with pytest.raises(Unauthenticated):
        await auth.authenticate(bearer(token))


async def test_jwks_kid_of_a_key_of_another_type_is_401_not_a_crash(auth: Authenticator, keys: Keys) -> None:
    token = keys.jwks_token(kid="ec-1")
    with pytest.raises(Unauthenticated):
        await auth.authenticate(bearer(token))


async def test_the_mixed_issuer_still_verifies_its_own_key(auth: Authenticator, keys: Keys) -> None:
    token = keys.rsa_token(iss=MIXED_ISS, org=DROP, tenant="acme")
    assert (await auth.authenticate(bearer(token))).tenant == "acme"


# --- JWKS lookups -------------------------------------------------------------------------------------


async def test_jwks_keys_are_fetched_once_and_cached(
    auth: Authenticator, keys: Keys, jwks: FakeJwksEndpoint
) -> None:
    for _ in range(20):
        assert (await auth.authenticate(bearer(keys.jwks_token()))).tenant == "acme"
    assert jwks.fetched == [JWKS_URL]


async def test_unknown_kids_within_the_cooldown_do_not_refetch(
    auth: Authenticator, keys: Keys, jwks: FakeJwksEndpoint
) -> None:
    await auth.authenticate(bearer(keys.jwks_token()))
    for index in range(20):
        with pytest.raises(Unauthenticated):
            await auth.authenticate(bearer(keys.jwks_token(kid=f"unknown-{index}")))
    assert jwks.fetched == [JWKS_URL]


async def test_malformed_kids_never_fetch_even_with_a_cold_cache(
    auth: Authenticator, keys: Keys, jwks: FakeJwksEndpoint
) -> None:
    for kid in ("a b", "\x00", "k" * 257, "\u00e9", 7, None):
        with pytest.raises(Unauthenticated) as info:
            await auth.authenticate(bearer(keys.jwks_token(kid=kid)))
        assert info.value.message in (
            "Unauthorized: the token has no usable kid",
            "Unauthorized: the bearer token is malformed",  # pyjwt itself refuses a non-string kid
        )
    assert jwks.fetched == []


# --- construction, challenge and metadata -------------------------------------------------------------


def test_metadata_document(auth: Authenticator) -> None:
    assert auth.metadata == {
        "resource": RESOURCE,
        "authorization_servers": ["https://idp.test"],
        "bearer_methods_supported": ["header"],
        "scopes_supported": ["notes:read", "notes:write"],
    }
    assert auth.metadata_url == METADATA


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        ("http://127.0.0.1:8080/mcp", "http://127.0.0.1:8080/.well-known/oauth-protected-resource/mcp"),
        ("https://mcp.example.com/", "https://mcp.example.com/.well-known/oauth-protected-resource"),
        ("https://mcp.example.com/a/b/", "https://mcp.example.com/.well-known/oauth-protected-resource/a/b"),
    ],
)
def test_metadata_url(resource: str, expected: str) -> None:
    assert metadata_url(resource) == expected


def test_challenge_escapes_quotes(auth: Authenticator) -> None:
    value = auth.challenge("invalid_token", 'a "quoted" \\ thing')
    assert value.endswith(", error_description=\"a 'quoted'  thing\"")


@pytest.mark.parametrize("secret", ["", "short", "x" * 31])
def test_hmac_secret_must_be_long_enough(config: ProxyConfig, secret: str) -> None:
    with pytest.raises(ConfigError) as info:
        Authenticator(config, env={**ENV, DEV_SECRET_ENV: secret})
    assert info.value.key_path == "auth.issuers.0.secret_env"
    assert DEV_SECRET_ENV in info.value.problem


@pytest.mark.parametrize(
    ("secret", "problem"),
    [
        ("replace-me-with-32-or-more-random-bytes-0123456789", "placeholder ('replace')"),
        ("CHANGEME-" + "Kq3vX9pLm2RtY7wZ4nB8cF1hJ6sD0gA5", "placeholder ('changeme')"),
        ("change-me-Kq3vX9pLm2RtY7wZ4nB8cF1hJ6sD0gA5", "placeholder ('change-me')"),
        ("my-Jwt-Secret-Kq3vX9pLm2RtY7wZ4nB8cF1hJ6sD0gA5", "placeholder ('secret')"),
        ("Kq3vX9pLm2RtY7wZ4nB8cF1hJ6sD0gA5-example", "placeholder ('example')"),
        ("Password1-Kq3vX9pLm2RtY7wZ4nB8cF1hJ6sD0gA5", "placeholder ('password')"),
        ("<placeholder>Kq3vX9pLm2RtY7wZ4nB8cF1hJ6sD0gA5", "placeholder ('placeholder')"),
        ("TODO: Kq3vX9pLm2RtY7wZ4nB8cF1hJ6sD0gA5", "placeholder ('todo')"),
        ("xxx-Kq3vX9pLm2RtY7wZ4nB8cF1hJ6sD0gA5", "placeholder ('xxx')"),
        ("sk-live-" + "x" * 32, "placeholder ('xxx')"),
        ("a" * 64, "one character repeated"),
        ("abababababababababababababababab12", "only 4 distinct characters"),
        ("0123456789abcdefghijklmnopqrstuvwxyz", "guessable"),  # many characters, one step
        ("q8Z!kP2@mN5#xR7$" * 3, "guessable"),  # a short secret, repeated
        ("a" * 32 + "b1c2d3e4f5g6h7", "guessable"),  # one character most of the time
        ("b7e833e1dd6e92144f936d0cc98a5b4a", "guessable"),  # 32 hex digits: 128 bits, HS256 wants 256
    ],
)
def test_hmac_secret_must_not_be_a_placeholder_or_guessable(
    config: ProxyConfig, secret: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Authenticator(config, env={**ENV, DEV_SECRET_ENV: secret})
    assert info.value.key_path == "auth.issuers.0.secret_env"
    assert info.value.problem.startswith(f"environment variable {DEV_SECRET_ENV} holds ")
    assert problem in info.value.problem
    assert "secrets.token_urlsafe(32)" in info.value.problem  # how to make a good one
    assert secret not in str(info.value)  # the refused value is not echoed to the log
    with pytest.raises(ValueError, match="environment variable"):  # mint-token refuses it too
        mint_token(config, "dev", "acme", "alice", env={DEV_SECRET_ENV: secret})


def test_generated_secrets_always_pass() -> None:
    # The generators operators are told to use, over many samples. Seeded, so the run is repeatable;
    # a few real secrets.token_urlsafe(32) besides. (A generated secret that happens to hold a
    # placeholder word is refused about once in a million: no seed here draws one.)
    rng = random.Random(20240611)
    samples = [
        *(base64.urlsafe_b64encode(rng.randbytes(32)).rstrip(b"=").decode() for _ in range(20_000)),
        *(base64.urlsafe_b64encode(rng.randbytes(24)).decode() for _ in range(5_000)),  # token_urlsafe(24)
        *(rng.randbytes(32).hex() for _ in range(2_000)),  # token_hex(32), openssl rand -hex 32
        *(base64.b64encode(rng.randbytes(32)).decode() for _ in range(2_000)),  # openssl rand -base64 32
        *(secrets.token_urlsafe(32) for _ in range(200)),
    ]
    refused = {secret: problem for secret in samples if (problem := hmac_secret_problem(secret))}
    assert refused == {}


def test_the_test_secrets_pass() -> None:
    assert hmac_secret_problem(DEV_SECRET) is None
    assert hmac_secret_problem(OTHER_SECRET) is None


def test_missing_hmac_secret_names_the_issuer(config: ProxyConfig) -> None:
    with pytest.raises(ConfigError) as info:
        Authenticator(config, env={DEV_SECRET_ENV: DEV_SECRET})
    assert info.value.key_path == "auth.issuers.1.secret_env"
    assert OTHER_SECRET_ENV in info.value.problem


@pytest.mark.parametrize(
    "content", [None, b"not a pem", b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"]
)
def test_unusable_public_key_file_is_a_config_error(tmp_path: Path, content: bytes | None) -> None:
    pem = tmp_path / "bad.pem"
    if content is not None:
        pem.write_bytes(content)
    config = make_config(issuers=issuers(pem)[2:3])
    with pytest.raises(ConfigError) as info:
        Authenticator(config, env={})
    assert info.value.key_path == "auth.issuers.0.public_key_file"
    assert info.value.problem.startswith("cannot load a PEM public key")


# --- the audience: listen.public_url is this resource's identifier (README) ----------------------

OTHER_API = "https://some-other-api.example.com"


@pytest.mark.parametrize(
    ("audiences", "aud", "accepted"),
    [
        ([OTHER_API], RESOURCE, True),  # public_url is always an accepted audience
        ([OTHER_API], OTHER_API, True),  # and so is what the operator lists
        ([], RESOURCE, True),  # audiences may be left out
        ([], OTHER_API, False),
        ([RESOURCE], "https://evil.example.com/mcp", False),
        ([RESOURCE], [OTHER_API, RESOURCE], True),  # one of several audiences is this resource
    ],
)
async def test_tokens_may_name_public_url_as_their_audience(
    audiences: list[str], aud: Any, accepted: bool
) -> None:
    issuer = {
        "issuer": "dev",
        "audiences": audiences,
        "algorithms": ["HS256"],
        "secret_env": DEV_SECRET_ENV,
        "tenant_claim": "tenant",
    }
    if not audiences:
        del issuer["audiences"]
    auth = Authenticator(make_config(issuers=[issuer]), env=ENV)
    now_s = int(time.time())
    token = jwt.encode(
        {"iss": "dev", "aud": aud, "sub": "alice", "tenant": "acme", "iat": now_s, "exp": now_s + 60},
        DEV_SECRET,
        algorithm="HS256",
    )
    if accepted:
        assert (await auth.authenticate(bearer(token))).tenant == "acme"
    else:
        with pytest.raises(Unauthenticated, match="not issued for this resource"):
            await auth.authenticate(bearer(token))


async def test_mint_token_names_public_url_and_the_proxy_accepts_it() -> None:
    config = make_config(
        issuers=[
            {
                "issuer": "dev",
                "audiences": [OTHER_API],
                "algorithms": ["HS256"],
                "secret_env": DEV_SECRET_ENV,
                "tenant_claim": "tenant",
            }
        ]
    )
    token = mint_token(config, "dev", "acme", "alice", env=ENV)
    assert jwt.decode(token, options={"verify_signature": False})["aud"] == RESOURCE
    assert (await Authenticator(config, env=ENV).authenticate(bearer(token))).subject == "alice"


def test_mint_token_refuses_a_secret_the_proxy_would_refuse() -> None:
    config = make_config()
    with pytest.raises(ValueError, match="at least 32 bytes"):
        mint_token(config, "dev", "acme", "alice", env={DEV_SECRET_ENV: "short"})


async def test_a_subject_that_is_not_valid_text_is_401_not_a_crash_later() -> None:
    # A JSON "\ud800" escape decodes to a lone surrogate, which no session key, Redis record or
    # audit line could hold: refused where the token is checked.
    auth = Authenticator(make_config(), env=ENV)
    now_s = int(time.time())
    claims = {"iss": "dev", "aud": RESOURCE, "sub": "ali\ud800ce", "tenant": "acme", "exp": now_s + 60}
    token = forge_hs256({"alg": "HS256", "typ": "JWT"}, claims, DEV_SECRET.encode())
    with pytest.raises(Unauthenticated, match="not valid text"):
        await auth.authenticate(bearer(token))
