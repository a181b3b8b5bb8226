"""THREATS B, resource URIs with `resources.public_uris`: a shared SDK upstream serving one scheme
with tenant-scoped readmes (each with its tenant's canary) and a guide every tenant shares.

Public URIs read and list for every tenant while another tenant's URI in the same scheme still
answers exactly as an unknown one; no URI trick (dot segments, encoded slashes or letters, case,
backslashes, authority or query games) turns a foreign URI into a public one, even under the
widest glob a policy may hold; without the key the shared guide stays unknown (fail closed).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any

import pytest
from mcp import MCPError
from mcp.server.mcpserver import MCPServer

from proxy.demo import client_for
from tests.conftest import TENANTS, RunningProxy, StartProxy
from tests.e2e.test_transport_e2e import initialize, session_headers
from tests.upstreams import Recorder, Upstream, UpstreamThread, free_port

pytestmark = pytest.mark.e2e

GUIDE = "docs://data/shared/guide.md"
CANARIES = {tenant: f"CANARY-{tenant}-{secrets.token_hex(6)}" for tenant in TENANTS}
TEMPLATES = ["docs://data/tenants/{tenant}/{path}"]
NARROW = {"resources": {"tenant_uri_templates": TEMPLATES, "public_uris": ["docs://data/shared/**"]}}
WIDE = {"resources": {"tenant_uri_templates": TEMPLATES, "public_uris": ["docs://data/**"]}}
CLOSED = {"resources": {"tenant_uri_templates": TEMPLATES}}


def readme_of(tenant: str) -> Callable[[], str]:
    def readme() -> str:
        return f"readme of {tenant} {CANARIES[tenant]}"

    return readme


def docs_server() -> MCPServer:
    """One scheme, docs://data/: each tenant's readme under tenants/, a guide for all under shared/."""
    server = MCPServer("docs")
    for tenant in TENANTS:
        server.resource(f"docs://data/tenants/{tenant}/readme", name=f"readme-{tenant}")(readme_of(tenant))

    @server.resource(GUIDE, name="guide")
    def guide() -> str:
        return "the shared guide"

    return server


@pytest.fixture(scope="module")
def docs_upstream(upstream_runner: UpstreamThread) -> Upstream:
    recorder = Recorder(docs_server().streamable_http_app(host="127.0.0.1"))
    port = free_port()
    upstream_runner.serve(recorder, port)
    return Upstream("shared", "", port, recorder)


async def docs_proxy(make_proxy: StartProxy, upstream: Upstream, policy: dict[str, Any]) -> RunningProxy:
    upstream.recorder.clear()
    return await make_proxy(
        dict.fromkeys(TENANTS, upstream.url),
        policies=dict.fromkeys(TENANTS, policy),
        tenants={
            t: {"upstream": {"url": upstream.url, "tenant_header": "X-MCP-Tenant"}, "policy": t}
            for t in TENANTS
        },
    )


def reads_of(upstream: Upstream, tenant: str) -> list[str]:
    """The URIs `tenant`'s resources/read requests named, as the upstream received them."""
    reads = []
    for record in upstream.recorder.snapshot():
        if record.headers.get("x-mcp-tenant") == tenant and '"resources/read"' in record.text:
            reads.append(json.loads(record.text)["params"]["uri"])
    return reads


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_a_public_uri_reads_and_lists_while_another_tenants_stays_unknown(
    make_proxy: StartProxy, docs_upstream: Upstream, mode: str
) -> None:
    running = await docs_proxy(make_proxy, docs_upstream, NARROW)
    for tenant in TENANTS:
        other = next(t for t in TENANTS if t != tenant)
        async with client_for(running.url, running.token(tenant), mode) as client:
            listed = sorted(r.uri for r in (await client.list_resources()).resources)
            assert listed == [GUIDE, f"docs://data/tenants/{tenant}/readme"]
            guide = await client.read_resource(GUIDE)
            assert guide.contents[0].text == "the shared guide"
            own = await client.read_resource(f"docs://data/tenants/{tenant}/readme")
            assert CANARIES[tenant] in own.contents[0].text
            with pytest.raises(MCPError) as unknown:
                await client.read_resource("docs://data/shared/nothing.md")  # the upstream's answer
            foreign = f"docs://data/tenants/{other}/readme"
            with pytest.raises(MCPError) as refused:
                await client.read_resource(foreign)
        assert (refused.value.error.code, refused.value.error.data) == (-32602, {"uri": foreign})
        assert unknown.value.error.data == {"uri": "docs://data/shared/nothing.md"}
        assert refused.value.error.message == unknown.value.error.message.replace(
            "docs://data/shared/nothing.md", foreign
        )
        assert CANARIES[other] not in json.dumps(listed)
        assert reads_of(docs_upstream, tenant) == [
            GUIDE,
            f"docs://data/tenants/{tenant}/readme",
            "docs://data/shared/nothing.md",
        ]


TRICKS = [
    "docs://data/tenants/globex/readme",
    "docs://data/shared/../tenants/globex/readme",
    "docs://data/shared/%2e%2e/tenants/globex/readme",
    "docs://data/shared/..%2Ftenants%2Fglobex%2Freadme",
    "docs://data/shared%2F..%2Ftenants%2Fglobex%2Freadme",
    "docs://data/shared/%252e%252e/tenants/globex/readme",
    "docs://data/shared\\..\\tenants\\globex\\readme",
    "DOCS://data/shared/../tenants/globex/readme",
    "docs://data/%74enants/globex/readme",  # an encoded letter: tenants, once decoded
    "docs://data/Tenants/globex/readme",
    "docs://data/\uff54enants/globex/readme",  # a fullwidth t: tenants, once NFKC-normalised
    "docs://data/tenants/globex/readme/extra",
    "docs://x@data/shared/guide.md",
    "docs://data/shared/guide.md?as=globex",
    "docs://data/shared/guide.md#globex",
]


@pytest.mark.parametrize("policy", [NARROW, WIDE], ids=["narrow-glob", "widest-glob"])
async def test_uri_tricks_never_pass_as_public(
    make_proxy: StartProxy, docs_upstream: Upstream, policy: dict[str, Any]
) -> None:
    running = await docs_proxy(make_proxy, docs_upstream, policy)
    token = running.token("acme")
    session = session_headers(await initialize(running, token))
    for number, uri in enumerate(TRICKS, start=1):
        body = {"jsonrpc": "2.0", "id": number, "method": "resources/read", "params": {"uri": uri}}
        status, _, raw = await running.post(body, token=token, headers=session)
        answer = json.loads(raw)
        assert status == 200, (uri, status)
        assert answer["error"]["code"] == -32602, (uri, answer)
        assert answer["error"]["message"] == f"Unknown resource: {uri}"
        assert CANARIES["globex"] not in raw.decode()
    assert reads_of(docs_upstream, "acme") == []  # none of them reached the upstream


async def test_without_public_uris_the_shared_guide_stays_unknown(
    make_proxy: StartProxy, docs_upstream: Upstream
) -> None:
    running = await docs_proxy(make_proxy, docs_upstream, CLOSED)
    async with client_for(running.url, running.token("acme")) as client:
        listed = [r.uri for r in (await client.list_resources()).resources]
        with pytest.raises(MCPError) as refused:
            await client.read_resource(GUIDE)
    assert listed == ["docs://data/tenants/acme/readme"]
    assert refused.value.error.code == -32602
    assert reads_of(docs_upstream, "acme") == []
