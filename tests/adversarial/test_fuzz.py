"""Structure-aware fuzzing of the request surface through the running proxy (THREATS B, E, F).

Hypothesis builds JSON-RPC/MCP requests (methods, params with tenant arguments anywhere, `_meta`,
routing headers, session ids) and sends them as acme through a proxy in front of two recording
upstreams, one per tenant. Whatever comes back, these must hold:

- no 5xx from the proxy's own code (the upstreams here never fail);
- no acme request ever reaches globex's upstream, and no tenant argument acme's upstream receives
  names anyone but acme;
- no globex canary in any answer acme gets.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.protocol.headers import encode_header_value
from tests.conftest import proxy_config
from tests.factories import RsaKeys, token
from tests.upstreams import free_port

pytestmark = pytest.mark.e2e

NAMES = ("tenant_id", "tenantId", "org_id")
POLICY = {
    "tenant_arguments": {"names": list(NAMES), "on_mismatch": "rewrite", "hide_from_schema": True},
    "tools": {"allow": ["*"], "deny": ["drop_*"]},
    "resources": {"tenant_uri_templates": ["notes://{tenant}/{path}"]},
}
TOOL = {
    "name": "lookup",
    "inputSchema": {
        "type": "object",
        "properties": {"tenant_id": {"type": "string", "x-mcp-header": "Tenant"}, "q": {"type": "string"}},
    },
}


@dataclass
class Fake:
    tenant: str
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append((dict(request.headers), body))
        try:
            message = json.loads(body) if body else {}
        except ValueError:
            return web.json_response(
                {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "x"}}
            )
        if "id" not in message:
            return web.Response(status=202)
        sent = message.get("params")
        params = sent if isinstance(sent, dict) else {}
        if message.get("method") == "tools/list":
            result: dict[str, Any] = {"tools": [TOOL]}
        elif message.get("method") in ("initialize", "server/discover"):  # as an SDK server answers
            asked = params.get("protocolVersion")
            result = {
                "protocolVersion": asked if asked in ("2025-11-25", "2025-06-18") else "2025-11-25",
                "supportedVersions": ["2026-07-28", "2025-11-25"],
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "fake", "version": "1"},
            }
        else:
            result = {"content": [{"type": "text", "text": f"CANARY-{self.tenant}"}], "isError": False}
        return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": result})


@dataclass
class World:
    port: int
    fakes: dict[str, Fake]
    acme_token: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from proxy.config import ProxyConfig
    from proxy.http.server import start_server

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    fakes = {tenant: Fake(tenant) for tenant in ("acme", "globex")}
    tmp = tmp_path_factory.mktemp("fuzz")

    async def start() -> tuple[Any, list[web.AppRunner], int]:
        runners, urls = [], {}
        for tenant, fake in fakes.items():
            app = web.Application()
            app.router.add_route("*", "/mcp", fake.handle)
            runner = web.AppRunner(app)
            await runner.setup()
            port = free_port()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            runners.append(runner)
            urls[tenant] = f"http://127.0.0.1:{port}/mcp"
        port = free_port()
        url = f"http://127.0.0.1:{port}/mcp"
        data = proxy_config(url, urls, Path(tmp), RsaKeys.generate("fuzz"), cache={"enabled": False})
        policies = Path(tmp) / "policies"
        policies.mkdir(exist_ok=True)
        (policies / "fuzz.yaml").write_text(json.dumps(POLICY))
        data["policies_dir"] = str(policies)
        for tenant in fakes:
            data["tenants"][tenant]["policy"] = "fuzz"
        proxy_runner, _ = await start_server(ProxyConfig.model_validate(data))
        return proxy_runner, runners, port

    proxy_runner, runners, port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    acme = token(tenant="acme", sub="fuzzer", aud=f"http://127.0.0.1:{port}/mcp")
    try:
        yield World(port, fakes, acme)
    finally:

        async def stop() -> None:
            await proxy_runner.cleanup()
            for runner in runners:
                await runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


# --- strategies --------------------------------------------------------------------------------

tenantish = st.sampled_from(["acme", "globex", "ACME", " acme", "acme\n", "gl\u043ebex", "%61cme", "", "*"])
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False), tenantish,
    st.text(max_size=6),
)  # fmt: skip
keys = st.one_of(st.sampled_from([*NAMES, "q", "filter", "items", "_meta"]), st.text(max_size=5))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=3)),
    max_leaves=20,
)
methods = st.sampled_from(
    ["tools/call", "tools/list", "prompts/get", "completion/complete", "resources/read", "resources/list",
     "server/discover", "initialize", "ping", "tools/unknown", "notifications/cancelled", ""]
)  # fmt: skip
meta = st.fixed_dictionaries(
    {},
    optional={
        "io.modelcontextprotocol/protocolVersion": st.sampled_from(["2026-07-28", "2025-11-25", "bogus"]),
        "io.modelcontextprotocol/clientCapabilities": st.just({}),
        "progressToken": st.one_of(st.integers(), st.text(max_size=4)),
    },
)


def _name_header(method: str, params: dict[str, Any]) -> str | None:
    key = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}.get(method)
    value = params.get(key) if key else None
    return encode_header_value(value) if isinstance(value, str) else None


@st.composite
def requests(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, str]]:
    """Mostly well-formed modern requests (so they reach the policy and the upstream), some mutated."""
    method = draw(methods)
    params: dict[str, Any] = {}
    if method in ("tools/call", "prompts/get"):
        params["name"] = draw(st.sampled_from(["lookup", "lookup", "drop_table", "x"]))
        params["arguments"] = draw(st.dictionaries(keys, values, max_size=4))
    elif method == "completion/complete":
        params["ref"] = draw(
            st.sampled_from(
                [{"type": "ref/prompt", "name": "p"}, {"type": "ref/resource", "uri": "notes://globex/{p}"}]
            )
        )
        params["argument"] = {"name": draw(st.sampled_from([*NAMES, "q"])), "value": draw(tenantish)}
        params["context"] = {"arguments": draw(st.dictionaries(keys, values, max_size=3))}
    elif method == "resources/read":
        params["uri"] = draw(st.sampled_from(URIS))
    params.update(draw(st.dictionaries(st.sampled_from(["cursor", "extra"]), values, max_size=2)))
    params["_meta"] = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        **draw(st.dictionaries(st.sampled_from(["progressToken", "x"]), scalars, max_size=1)),
    }
    body: dict[str, Any] = {
        "jsonrpc": "2.0",
        "id": draw(st.integers(0, 10**6)),
        "method": method,
        "params": params,
    }
    headers = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": method}
    name = _name_header(method, params)
    if name is not None:
        headers["Mcp-Name"] = name
    arguments = params.get("arguments")
    if method == "tools/call" and isinstance(arguments, dict):
        mirrored = arguments.get("tenant_id")
        if isinstance(mirrored, str):
            headers["Mcp-Param-Tenant"] = encode_header_value(mirrored)
        elif isinstance(mirrored, bool | int):
            headers["Mcp-Param-Tenant"] = (
                str(mirrored).lower() if isinstance(mirrored, bool) else str(mirrored)
            )
    for _ in range(draw(st.integers(0, 2))):  # mutations: the proxy must refuse cleanly, never forward
        mutation = draw(st.sampled_from(["drop", "header", "meta", "jsonrpc", "id", "session"]))
        if mutation == "drop" and headers:
            headers.pop(draw(st.sampled_from(sorted(headers))))
        elif mutation == "header":
            headers[
                draw(st.sampled_from(["Mcp-Method", "Mcp-Name", "Mcp-Param-Tenant", "MCP-Protocol-Version"]))
            ] = draw(
                st.sampled_from(["acme", "globex", "=?base64?Z2xvYmV4?=", "2025-11-25", "tools/list", "*"])
            )
        elif mutation == "meta":
            params["_meta"] = draw(st.one_of(st.none(), values))
        elif mutation == "jsonrpc":
            body["jsonrpc"] = draw(st.sampled_from(["1.0", 2, None]))
        elif mutation == "id":
            body["id"] = draw(
                st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.lists(st.integers()))
            )
        else:
            headers["Mcp-Session-Id"] = draw(st.text("abcdef0123456789", min_size=1, max_size=40))
    return body, headers


URIS = ["notes://acme/a", "notes://globex/a", "notes://acme/../globex/a", "NOTES://globex/x",
        "notes://acme%2Fglobex/x", "file:///etc/passwd"]  # fmt: skip


def send(world: World, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", world.port, timeout=10)
    try:
        connection.request(
            "POST",
            "/mcp",
            body=json.dumps(body).encode(),
            headers={
                "Authorization": f"Bearer {world.acme_token}",
                "Content-Type": "application/json",
                "Accept": "application/json, text/event-stream",
                **headers,
            },
        )
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def tenant_arguments(value: Any) -> Iterator[Any]:
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, child in node.items():
                if key in NAMES:
                    yield child
                else:
                    stack.append(child)
        elif isinstance(node, list):
            stack.extend(node)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])  # fmt: skip
@example(
    request=(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
         "params": {"name": "lookup", "arguments": {"q": [{"tenant_id": "globex"}]},
                    "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                              "io.modelcontextprotocol/clientCapabilities": {}}}},
        {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": "lookup"},
    )
)  # fmt: skip
@given(request=requests())
def test_no_request_crosses_tenants_or_breaks_the_proxy(
    world: World, request: tuple[dict[str, Any], dict[str, str]]
) -> None:
    body, headers = request
    before = len(world.fakes["acme"].received)
    status, answer = send(world, body, headers)
    assert status < 500, answer
    assert b"CANARY-globex" not in answer
    assert world.fakes["globex"].received == []
    for sent_headers, sent in world.fakes["acme"].received[before:]:
        assert sent_headers.get("Mcp-Param-Tenant", "acme") == "acme"
        if not sent:
            continue
        forwarded = json.loads(sent)
        for value in tenant_arguments(forwarded.get("params", {}).get("arguments")):
            assert value == "acme", forwarded


def test_the_fuzzer_reached_the_upstream(world: World) -> None:
    """Runs after the fuzz test (same module world): enough generated requests got through the
    proxy to the upstream for the invariants above to mean something."""
    assert len(world.fakes["acme"].received) >= 50
