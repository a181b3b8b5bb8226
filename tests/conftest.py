from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from tests.factories import DEV_SECRET, DEV_SECRET_ENV, RsaKeys, config_dict, token

OTHER_ISSUER = "https://rsa.idp.test"  # a second issuer for every tenant (tenant claim org.id)

os.environ[DEV_SECRET_ENV] = DEV_SECRET

TENANTS = ("acme", "globex")
MCP_ACCEPT = "application/json, text/event-stream"


@pytest.fixture(scope="session")
def rsa_keys() -> RsaKeys:
    return RsaKeys.generate("key-1")


@pytest.fixture(scope="session")
def upstream_runner() -> Iterator[Any]:
    from tests.upstreams import UpstreamThread

    runner = UpstreamThread()
    try:
        yield runner
    finally:
        runner.stop()


@pytest.fixture(scope="session")
def upstream_servers(upstream_runner: Any) -> dict[str, Any]:
    """One SDK notes server per tenant, each with its own canary."""
    from tests.upstreams import start_notes_upstream

    return {
        tenant: start_notes_upstream(upstream_runner, tenant, f"CANARY-{tenant}-{secrets.token_hex(6)}")
        for tenant in TENANTS
    }


@pytest.fixture(scope="session")
def shared_upstream_server(upstream_runner: Any) -> Any:
    """One tenant-aware SDK notes server that several tenants share (it trusts `tenant_id`)."""
    from tests.upstreams import start_notes_upstream

    return start_notes_upstream(upstream_runner, "shared", f"CANARY-shared-{secrets.token_hex(6)}")


@pytest.fixture
def shared_upstream(shared_upstream_server: Any) -> Any:
    shared_upstream_server.recorder.clear()
    return shared_upstream_server


@pytest.fixture
def upstreams(upstream_servers: dict[str, Any]) -> dict[str, Any]:
    """The tenants' upstreams, with their request records cleared for this test."""
    for upstream in upstream_servers.values():
        upstream.recorder.clear()
    return upstream_servers


@dataclass
class RunningProxy:
    url: str
    config: Any
    app: web.Application
    rsa: RsaKeys | None = None  # the second issuer's key (make_proxy's proxies)

    @property
    def metrics_url(self) -> str:
        """/metrics on the proxy's own metrics listener."""
        from proxy.http.keys import METRICS_LISTENER

        return f"http://127.0.0.1:{self.app[METRICS_LISTENER].port}/metrics"

    def token(self, tenant: str = "acme", sub: str = "alice", **claims: Any) -> str:
        return token(tenant=tenant, sub=sub, aud=self.url, **claims)

    def other_issuer_token(self, tenant: str = "acme", sub: str = "alice") -> str:
        """The same tenant and `sub` from the second issuer (RS256): another principal."""
        assert self.rsa is not None, "only make_proxy's proxies know the second issuer's key"
        claims = {"iss": OTHER_ISSUER, "org": {"id": tenant}, "sub": sub, "aud": self.url}
        return token(claims, key=self.rsa.private_pem, algorithm="RS256", drop=("tenant",))

    async def post(
        self,
        body: Any,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One raw POST to the proxy; returns status, headers and body."""
        sent = {"Accept": MCP_ACCEPT, "Content-Type": "application/json"}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        sent.update(headers or {})
        data = raw if raw is not None else aiohttp.payload.JsonPayload(body)
        async with (
            aiohttp.ClientSession() as http,
            http.post(self.url, data=data, headers=sent) as response,
        ):
            return response.status, dict(response.headers), await response.read()


def proxy_config(
    url: str, upstreams: dict[str, Any], tmp: Path, rsa: RsaKeys, **overrides: Any
) -> dict[str, Any]:
    public_key = tmp / "rsa.pem"
    public_key.write_bytes(rsa.public_pem)
    private_key = tmp / "rsa.key"
    private_key.write_bytes(rsa.private_pem)
    data = config_dict(
        {tenant: getattr(upstream, "url", upstream) for tenant, upstream in upstreams.items()},
        resource=url,
        issuers=[
            {
                "issuer": "dev",
                "audiences": [url],
                "algorithms": ["HS256"],
                "secret_env": DEV_SECRET_ENV,
                "tenant_claim": "tenant",
            },
            {
                "issuer": OTHER_ISSUER,
                "audiences": [url],
                "algorithms": ["RS256"],
                "public_key_file": str(public_key),
                "private_key_file": str(private_key),
                "tenant_claim": "org.id",
            },
        ],
    )
    for tenant in upstreams:
        data["tenants"][tenant]["upstream"]["headers"] = {"Authorization": f"Bearer upstream-secret-{tenant}"}
    for key, value in overrides.items():
        if key in ("listen", "metrics"):  # they keep their addresses: only the given keys change
            data[key].update(value)
        else:
            data[key] = value
    return data


StartProxy = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def make_proxy(tmp_path: Path, rsa_keys: RsaKeys) -> AsyncIterator[StartProxy]:
    """Start proxies for this test: tenant -> upstream URL, optional tenant -> policy mapping."""
    from proxy.config import ProxyConfig
    from proxy.http.server import start_server
    from tests.upstreams import free_port

    runners: list[web.AppRunner] = []

    async def start(
        upstreams: dict[str, Any], policies: dict[str, dict[str, Any]] | None = None, **overrides: Any
    ) -> RunningProxy:
        url = f"http://127.0.0.1:{free_port()}/mcp"
        data = proxy_config(url, upstreams, tmp_path, rsa_keys, **overrides)
        if policies:
            policy_dir = tmp_path / f"policies-{len(runners)}"
            policy_dir.mkdir()
            data["policies_dir"] = str(policy_dir)
            for tenant, policy in policies.items():
                (policy_dir / f"{tenant}.yaml").write_text(yaml.safe_dump(policy))
                data["tenants"][tenant]["policy"] = tenant
        config = ProxyConfig.model_validate(data, context={})
        runner, _ = await start_server(config)
        runners.append(runner)
        return RunningProxy(url, config, runner.app, rsa_keys)

    try:
        yield start
    finally:
        for runner in runners:
            await runner.cleanup()


@pytest.fixture
async def proxy(upstreams: dict[str, Any], make_proxy: StartProxy) -> RunningProxy:
    """A running proxy in front of the two tenants' own upstreams, no policy."""
    return await make_proxy(upstreams)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-seconds",
        type=float,
        default=25.0,
        help="how long the soak test (pytest -m soak) keeps its clients busy (default: 25)",
    )
