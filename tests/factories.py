"""Test factories: configs, keys, tokens and exchanges, so each stage can be tested without sockets."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from aiohttp.test_utils import make_mocked_request
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.config import ProxyConfig
from proxy.flow import Exchange, Request, authenticated, parsed
from proxy.layers.data_access.catalog import Catalog
from proxy.protocol.jsonrpc import parse_message
from proxy.runtime import Runtime, Services
from proxy.types import Era, TenantContext
from proxy.upstreams.base import Upstream

# secrets.token_urlsafe(32) output, fixed: the proxy refuses placeholder-looking and guessable secrets.
DEV_SECRET = "2J62pYnh2W7iBSwidviF-WWuH3SbNbv3MaIQROukDFI"
DEV_SECRET_ENV = "MCP_PROXY_TEST_SECRET"
RESOURCE = "http://127.0.0.1:8080/mcp"
# A handshake-era initialize as a test client sends it (posted as is; never mutated).
HANDSHAKE_INITIALIZE: dict[str, Any] = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}


@dataclass(frozen=True)
class RsaKeys:
    private_pem: bytes
    public_pem: bytes
    kid: str

    @classmethod
    def generate(cls, kid: str) -> RsaKeys:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        public_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(private_pem, public_pem, kid)

    def jwk(self) -> dict[str, Any]:
        public = serialization.load_pem_public_key(self.public_pem)
        assert isinstance(public, rsa.RSAPublicKey)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
        return {**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}


def config_dict(
    upstreams: Mapping[str, str],
    *,
    resource: str = RESOURCE,
    issuers: list[dict[str, Any]] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A complete config as the YAML would give it, with a dev HS256 issuer by default."""
    parts = resource.split("/")
    host, _, port = parts[2].partition(":")
    data: dict[str, Any] = {
        "listen": {
            "host": host,
            "port": int(port or 80),
            "path": "/" + "/".join(parts[3:]),
            "public_url": resource,
            # A test that stops a proxy process wants it gone at once; tests of the drain set their own.
            "drain_delay_seconds": 0,
        },
        "auth": {
            "authorization_servers": ["https://idp.test"],
            "issuers": issuers
            or [
                {
                    "issuer": "dev",
                    "audiences": [resource],
                    "algorithms": ["HS256"],
                    "secret_env": DEV_SECRET_ENV,
                    "tenant_claim": "tenant",
                }
            ],
        },
        "tenants": {tenant: {"upstream": {"url": url}} for tenant, url in upstreams.items()},
        "audit": {"dir": None},
        # a free port: tests run side by side, and the default (9464) is one port for all of them
        "metrics": {"listen": {"host": "127.0.0.1", "port": 0}},
    }
    data.update(overrides)
    return data


def make_config(upstreams: Mapping[str, str] | None = None, **kwargs: Any) -> ProxyConfig:
    return ProxyConfig.model_validate(
        config_dict(
            upstreams or {"acme": "http://127.0.0.1:9/mcp", "globex": "http://127.0.0.1:9/mcp"}, **kwargs
        )
    )


def token(
    claims: Mapping[str, Any] | None = None,
    *,
    key: str | bytes = DEV_SECRET,
    algorithm: str = "HS256",
    headers: Mapping[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    **claim_overrides: Any,
) -> str:
    """A token for the dev issuer unless told otherwise; `drop` removes default claims."""
    now = int(time.time())
    body: dict[str, Any] = {
        "iss": "dev",
        "aud": RESOURCE,
        "sub": "alice",
        "tenant": "acme",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    body.update(claims or {})
    body.update(claim_overrides)
    for name in drop:
        body.pop(name, None)
    return jwt.encode(body, key, algorithm=algorithm, headers=dict(headers or {}))


def unsigned_token(header: Mapping[str, Any], claims: Mapping[str, Any]) -> str:
    """A token with an arbitrary header and no (or an empty) signature, e.g. alg=none."""

    def part(value: Mapping[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part(header)}.{part(claims)}."


def make_exchange(
    config: ProxyConfig,
    method: str = "POST",
    headers: Mapping[str, str] | None = None,
    path: str = "/mcp",
    runtime: Runtime | None = None,
) -> Exchange:
    request = make_mocked_request(method, path, headers=dict(headers or {}))
    return Exchange(
        request=request, runtime=runtime or Runtime.build(config), services=Services.build(config)
    )


def make_request(
    config: ProxyConfig,
    tenant: str = "acme",
    body: Mapping[str, Any] | None = None,
    era: Era = Era.MODERN,
    subject: str = "alice",
    **fields: Any,
) -> Request:
    """An authenticated, parsed exchange (the Request phase), as the stages after `parse` get it."""
    exchange = make_exchange(config)
    ctx = TenantContext(tenant, subject, "dev", frozenset(), time.time() + 3600)
    message = parse_message(json.dumps(body or {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).encode())
    call = authenticated(exchange, ctx, exchange.runtime.tenants.explicit[tenant])
    request = parsed(call, message, era, None)
    for name, value in fields.items():
        setattr(request, name, value)
    return request


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def with_upstreams(runtime: Runtime, upstreams: Mapping[str, Upstream]) -> Runtime:
    """The runtime with these tenants served by the given upstreams (a MockUpstream, say), each with
    a catalog of its own that lists through it."""
    for tenant, upstream in upstreams.items():
        runtime.tenants.explicit[tenant] = dataclasses.replace(
            runtime.tenants.explicit[tenant], upstream=upstream, catalog=Catalog(upstream)
        )
    return runtime
