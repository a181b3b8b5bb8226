"""THREATS E, leakage through an upstream's errors: an error naming another tenant's resource.

A shared SDK upstream whose resource handler answers "not found" for a resource of the caller's
own, naming instead another tenant's resource (in `data.uri`, SEP-2164, and in its message), as a
careless server that resolves, redirects or caches across tenants would. The client keeps the
error's code but never the other tenant's URI; an error naming the caller's own resource passes
with its `data.uri`. Both eras: the handshake era's error travels in a 200 answer, the 2026-07-28
one in an HTTP 400 answer: two different relay paths.
"""

from __future__ import annotations

import json

import pytest
from mcp import MCPError
from mcp.server.mcpserver import MCPServer

from proxy.demo import client_for
from tests.conftest import TENANTS, RunningProxy, StartProxy
from tests.upstreams import Recorder, Upstream, UpstreamThread, free_port

pytestmark = pytest.mark.e2e

POLICY = {"resources": {"tenant_uri_templates": ["notes://{tenant}/{path}"]}}


def misdirecting_server() -> MCPServer:
    """Answers `notes://T/moved-N` with "not found" naming globex's resource (as -32602, or as the
    earlier -32002), `notes://T/gone-N` with its own URI."""
    server = MCPServer("misdirecting")

    @server.resource("notes://{tenant_id}/{name}")
    def note(tenant_id: str, name: str) -> str:
        if name.startswith("moved"):
            code = -32002 if name.endswith("legacy-code") else -32602
            foreign = f"notes://globex/{name}"
            raise MCPError(code, f"Unknown resource: {foreign}", data={"uri": foreign, "owner": "globex"})
        if name.startswith("gone"):
            own = f"notes://{tenant_id}/{name}"
            raise MCPError(-32602, f"Unknown resource: {own}", data={"uri": own})
        return f"note {name} of {tenant_id}"

    return server


@pytest.fixture(scope="module")
def misdirecting(upstream_runner: UpstreamThread) -> Upstream:
    recorder = Recorder(misdirecting_server().streamable_http_app(host="127.0.0.1"))
    port = free_port()
    upstream_runner.serve(recorder, port)
    return Upstream("shared", "", port, recorder)


@pytest.fixture
async def shared_proxy(make_proxy: StartProxy, misdirecting: Upstream) -> RunningProxy:
    return await make_proxy(dict.fromkeys(TENANTS, misdirecting.url), policies=dict.fromkeys(TENANTS, POLICY))


@pytest.mark.parametrize("mode", ["auto", "legacy"])
@pytest.mark.parametrize("name", ["moved-1", "moved-legacy-code"])
async def test_an_error_naming_another_tenants_resource_never_shows_it(
    shared_proxy: RunningProxy, mode: str, name: str
) -> None:
    async with client_for(shared_proxy.url, shared_proxy.token("acme"), mode) as client:
        own = await client.read_resource("notes://acme/plan")
        assert "note plan of acme" in own.contents[0].text
        with pytest.raises(MCPError) as refused:
            await client.read_resource(f"notes://acme/{name}")
    error = refused.value.error
    assert error.code in (-32602, -32002)  # the code is the upstream's own
    assert error.data is None
    assert "globex" not in json.dumps(error.model_dump(mode="json"))


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_an_error_naming_the_callers_own_resource_keeps_its_data_uri(
    shared_proxy: RunningProxy, mode: str
) -> None:
    async with client_for(shared_proxy.url, shared_proxy.token("acme"), mode) as client:
        with pytest.raises(MCPError) as missing:
            await client.read_resource("notes://acme/gone-1")
    assert missing.value.error.code == -32602
    assert missing.value.error.data == {"uri": "notes://acme/gone-1"}
    assert missing.value.error.message == "Unknown resource: notes://acme/gone-1"
