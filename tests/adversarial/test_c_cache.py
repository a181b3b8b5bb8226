"""THREATS C end to end: real SDK upstreams with per-tenant canaries and call counts, and a scripted
upstream shared by tenants whose ids would collide in a joined key, or that answers with errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from aiohttp import web
from mcp.server.caching import CacheHint
from mcp.server.mcpserver import MCPServer
from mcp_types import ElicitResult

from proxy.demo import client_for
from proxy.http.keys import SERVICES
from proxy.layers.cache.store import ResponseCache
from tests.conftest import OTHER_ISSUER, TENANTS, RunningProxy, StartProxy
from tests.upstreams import Recorder, free_port

pytestmark = pytest.mark.e2e

POLICY = {"tools": {"cache_ttl_seconds": {"lookup": 60, "slow_lookup": 60, "broken": 60}}}
META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}


def counting_server(tenant: str, canary: str) -> MCPServer:
    server = MCPServer(
        f"count-{tenant}", cache_hints={"tools/list": CacheHint(ttl_ms=60_000, scope="private")}
    )
    calls = {"n": 0}

    @server.tool()
    def lookup(key: str, n: float = 0) -> dict[str, Any]:
        """Answers with the server's canary and how many calls it has served."""
        calls["n"] += 1
        return {"canary": canary, "key": key, "n": n, "calls": calls["n"]}

    @server.tool()
    async def slow_lookup(key: str) -> dict[str, Any]:
        """Like lookup, slowly, so concurrent calls overlap."""
        calls["n"] += 1
        await anyio.sleep(0.3)
        return {"canary": canary, "key": key, "calls": calls["n"]}

    @server.tool()
    def broken(key: str) -> str:
        """Always fails: an isError result."""
        raise RuntimeError(f"broken {key} {canary}")

    return server


@pytest.fixture(scope="module")
def counting_upstreams(upstream_runner: Any) -> dict[str, Any]:
    servers = {}
    for tenant in TENANTS:
        recorder = Recorder(
            counting_server(tenant, f"CACHE-CANARY-{tenant}").streamable_http_app(host="127.0.0.1")
        )
        port = free_port()
        upstream_runner.serve(recorder, port)
        servers[tenant] = (f"http://127.0.0.1:{port}/mcp", recorder)
    return servers


@pytest.fixture
async def cached(counting_upstreams: dict[str, Any], make_proxy: StartProxy) -> RunningProxy:
    for _, recorder in counting_upstreams.values():
        recorder.clear()
    return await make_proxy(
        {tenant: url for tenant, (url, _) in counting_upstreams.items()},
        policies=dict.fromkeys(TENANTS, POLICY),
    )


async def call(running: RunningProxy, tenant: str, name: str, arguments: Any, sub: str = "alice") -> Any:
    body = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments, "_meta": META},
    }
    headers = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": name}
    status, response_headers, raw = await running.post(
        body, token=running.token(tenant, sub), headers=headers
    )
    assert status == 200, raw
    assert response_headers.get("Cache-Control", "").startswith("no-store")
    answer = json.loads(raw)
    assert answer["id"] == 7
    return answer["result"]


def payload(result: Any) -> dict[str, Any]:
    structured: dict[str, Any] = result["structuredContent"]
    return structured


def upstream_calls(upstreams: dict[str, Any], tenant: str) -> int:
    return sum('"method":"tools/call"' in r.text for r in upstreams[tenant][1].snapshot())


async def test_two_tenants_same_call_each_get_their_own_result_cold_and_warm(
    cached: RunningProxy, counting_upstreams: dict[str, Any]
) -> None:
    first: dict[str, int] = {}
    for _ in range(3):
        for tenant in TENANTS:
            result = payload(await call(cached, tenant, "lookup", {"key": "same"}))
            assert result["canary"] == f"CACHE-CANARY-{tenant}"
            # warm answers are the first (cached) one: the server's call count does not move
            assert result["calls"] == first.setdefault(tenant, result["calls"])
    assert upstream_calls(counting_upstreams, "acme") == 1
    assert upstream_calls(counting_upstreams, "globex") == 1
    cache = cached.app[SERVICES].cache
    assert isinstance(cache, ResponseCache)
    assert {key[0] for key, _ in cache.entries()} == {"acme", "globex"}


async def test_argument_order_is_canonical_but_number_forms_stay_distinct(
    cached: RunningProxy, counting_upstreams: dict[str, Any]
) -> None:
    await call(cached, "acme", "lookup", {"key": "k", "n": 1})
    await call(cached, "acme", "lookup", {"n": 1, "key": "k"})
    assert upstream_calls(counting_upstreams, "acme") == 1
    await call(cached, "acme", "lookup", {"key": "k", "n": 1.0})
    await call(cached, "acme", "lookup", {"key": "k", "n": 1.5})
    assert upstream_calls(counting_upstreams, "acme") == 3


async def test_error_results_are_never_cached(
    cached: RunningProxy, counting_upstreams: dict[str, Any]
) -> None:
    for _ in range(3):
        result = await call(cached, "acme", "broken", {"key": "x"})
        assert result["isError"] is True
    assert upstream_calls(counting_upstreams, "acme") == 3
    cache = cached.app[SERVICES].cache
    assert cache is not None
    assert len(cache) == 0


async def test_a_cold_stampede_makes_one_upstream_call_per_tenant(
    cached: RunningProxy, counting_upstreams: dict[str, Any]
) -> None:
    calls = [call(cached, tenant, "slow_lookup", {"key": "rush"}) for tenant in TENANTS for _ in range(15)]
    results = await asyncio.gather(*calls)
    for index, result in enumerate(results):
        tenant = TENANTS[index // 15]
        assert payload(result)["canary"] == f"CACHE-CANARY-{tenant}"
    assert upstream_calls(counting_upstreams, "acme") == 1
    assert upstream_calls(counting_upstreams, "globex") == 1


async def test_private_list_results_are_cached_per_subject(
    cached: RunningProxy, counting_upstreams: dict[str, Any]
) -> None:
    def lists(tenant: str) -> int:
        return sum('"method":"tools/list"' in r.text for r in counting_upstreams[tenant][1].snapshot())

    callers = {
        ("dev", "alice"): cached.token("acme", "alice"),
        ("dev", "bob"): cached.token("acme", "bob"),
        (OTHER_ISSUER, "alice"): cached.other_issuer_token("acme", "alice"),  # alice again, elsewhere
    }
    for _ in range(2):
        for token in callers.values():
            async with client_for(cached.url, token, cache=None) as client:
                tools = await client.list_tools()
                assert {t.name for t in tools.tools} == {"lookup", "slow_lookup", "broken"}
    assert lists("acme") == 3  # one per principal; the second round came from the proxy's cache
    cache = cached.app[SERVICES].cache
    assert isinstance(cache, ResponseCache)
    assert {key[1] for key, _ in cache.entries() if key[4] == "tools/list"} == {
        json.dumps(list(principal), separators=(",", ":")) for principal in callers
    }  # the principal: issuer and subject


async def test_handshake_era_calls_share_the_tenant_entry_and_keep_their_ids(
    cached: RunningProxy, counting_upstreams: dict[str, Any]
) -> None:
    async with client_for(cached.url, cached.token("acme"), "legacy", cache=None) as client:
        for _ in range(3):
            result = await client.call_tool("lookup", {"key": "legacy"})
            assert result.structured_content["canary"] == "CACHE-CANARY-acme"
    assert upstream_calls(counting_upstreams, "acme") == 1


async def test_cache_disabled_means_every_call_goes_upstream(
    counting_upstreams: dict[str, Any], make_proxy: StartProxy
) -> None:
    for _, recorder in counting_upstreams.values():
        recorder.clear()
    running = await make_proxy(
        {tenant: url for tenant, (url, _) in counting_upstreams.items()},
        policies=dict.fromkeys(TENANTS, POLICY),
        cache={"enabled": False},
    )
    for _ in range(2):
        await call(running, "acme", "lookup", {"key": "off"})
    assert upstream_calls(counting_upstreams, "acme") == 2


# --- a scripted upstream that several tenants share ---------------------------------------------


@dataclass
class SharedUpstream:
    """An aiohttp upstream behind every tenant of a proxy. The proxy's tenant header tells it whose
    request it serves; each tools/call answer names that tenant and the tool, with a per-tenant
    canary, or (for the rpc_error_* tools) is a JSON-RPC error in one of three forms."""

    port: int = field(default_factory=free_port)
    calls: list[tuple[str, str]] = field(default_factory=list)  # (tenant header, tool name)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def count(self, tenant: str, name: str) -> int:
        return self.calls.count((tenant, name))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        message = json.loads(await request.read())
        if "id" not in message:
            return web.Response(status=202)
        tenant = request.headers.get("X-MCP-Tenant", "")
        reply: dict[str, Any] = {"jsonrpc": "2.0", "id": message["id"]}
        if message["method"] == "tools/list":
            schema = {"type": "object", "properties": {"key": {"type": "string"}}}
            reply["result"] = {"tools": [{"name": name, "inputSchema": schema} for name in SHARED_TOOLS]}
            return web.json_response(reply)
        name = message["params"]["name"]
        self.calls.append((tenant, name))
        if name.startswith("rpc_error"):
            reply["error"] = {"code": -32602, "message": f"no such key for {tenant}"}
            if name == "rpc_error_sse":
                body = f"event: message\ndata: {json.dumps(reply)}\n\n"
                return web.Response(body=body.encode(), content_type="text/event-stream")
            return web.json_response(reply, status=400 if name == "rpc_error_http_400" else 200)
        payload = {
            "canary": f"SHARED-CANARY-{tenant}",
            "tenant": tenant,
            "name": name,
            "key": message["params"]["arguments"].get("key"),
            "n": self.count(tenant, name),
        }
        reply["result"] = {
            "content": [{"type": "text", "text": json.dumps(payload)}],
            "structuredContent": payload,
            "isError": False,
        }
        return web.json_response(reply)


ERROR_TOOLS = ("rpc_error_json", "rpc_error_sse", "rpc_error_http_400")
SEPARATORS = (".", "-", "_")
SHARED_TOOLS = ("lookup", *(f"b{sep}lookup" for sep in SEPARATORS), *ERROR_TOOLS)


@pytest.fixture
async def shared_upstream() -> AsyncIterator[SharedUpstream]:
    upstream = SharedUpstream()
    app = web.Application()
    app.router.add_post("/mcp", upstream.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", upstream.port).start()
    try:
        yield upstream
    finally:
        await runner.cleanup()


async def shared_proxy(
    make_proxy: StartProxy, upstream: SharedUpstream, tenants: tuple[str, ...]
) -> RunningProxy:
    policy = {"tools": {"cache_ttl_seconds": dict.fromkeys(SHARED_TOOLS, 60)}}
    return await make_proxy(
        dict.fromkeys(tenants, upstream.url),
        policies=dict.fromkeys(tenants, policy),
        tenants={t: {"upstream": {"url": upstream.url, "tenant_header": "X-MCP-Tenant"}} for t in tenants},
    )


@pytest.mark.parametrize("sep", SEPARATORS)
async def test_tenant_ids_that_would_collide_in_a_joined_key_each_get_their_own_result(
    make_proxy: StartProxy, shared_upstream: SharedUpstream, sep: str
) -> None:
    """Tenants `a<sep>b` and `a` on one upstream (the same upstream identity in the key), calling
    `lookup` and `b<sep>lookup` with the same arguments: joined with `sep`, the keys of
    (`a<sep>b`, `lookup`) and (`a`, `b<sep>lookup`) would be the same string. `:` is not allowed in
    a tenant id (^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$): these are the separators that are."""
    long, short = f"a{sep}b", "a"
    assert f"{long}{sep}lookup" == f"{short}{sep}b{sep}lookup"
    running = await shared_proxy(make_proxy, shared_upstream, (long, short))
    calls = [(long, "lookup"), (short, f"b{sep}lookup"), (short, "lookup"), (long, f"b{sep}lookup")]
    for round_ in range(3):
        for tenant, name in calls:
            result = payload(await call(running, tenant, name, {"key": f"k{sep}b"}))
            assert result == {
                "canary": f"SHARED-CANARY-{tenant}",
                "tenant": tenant,
                "name": name,
                "key": f"k{sep}b",
                "n": 1,  # the first answer, from the cache from round two on
            }, (round_, tenant, name)
    assert sorted(shared_upstream.calls) == sorted(calls)  # one upstream call each, never shared
    cache = running.app[SERVICES].cache
    assert isinstance(cache, ResponseCache)
    stored = {(key[0], key[5]): entry.result for key, entry in cache.entries()}
    assert set(stored) == set(calls)
    for (tenant, _), raw in stored.items():
        assert f'SHARED-CANARY-{tenant}"'.encode() in raw
        other = short if tenant == long else long
        assert f'SHARED-CANARY-{other}"'.encode() not in raw


@pytest.mark.parametrize("tool", ERROR_TOOLS)
async def test_json_rpc_error_answers_are_never_cached(
    make_proxy: StartProxy, shared_upstream: SharedUpstream, tool: str
) -> None:
    """A cache-listed tool whose upstream answers with a JSON-RPC error (as JSON, as an SSE event, or
    with HTTP 400): every call goes upstream, sequential or concurrent, and nothing is stored."""
    running = await shared_proxy(make_proxy, shared_upstream, TENANTS)
    body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
            "params": {"name": tool, "arguments": {"key": "x"}, "_meta": META}}  # fmt: skip
    headers = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": tool}

    async def once() -> None:
        status, response_headers, raw = await running.post(body, token=running.token("acme"), headers=headers)
        assert status == (400 if tool == "rpc_error_http_400" else 200)
        if tool == "rpc_error_sse":
            assert response_headers["Content-Type"].startswith("text/event-stream")
            (data,) = [line[5:].strip() for line in raw.decode().split("\n") if line.startswith("data:")]
            answer = json.loads(data)
        else:
            answer = json.loads(raw)
        assert answer == {
            "jsonrpc": "2.0",
            "id": 7,
            "error": {"code": -32602, "message": "no such key for acme"},
        }

    for _ in range(3):
        await once()
    await asyncio.gather(*(once() for _ in range(5)))
    assert shared_upstream.calls == [("acme", tool)] * 8
    cache = running.app[SERVICES].cache
    assert cache is not None
    assert len(cache) == 0


# --- results of exchanges with server-to-client requests (attack pass F2) ---------------------------

ASKING_TOOLS = {"ask_user": 60, "ask_user_on_session": 60, "whoami": 60}


def text_of(result: Any) -> str:
    return " ".join(getattr(block, "text", "") for block in getattr(result, "content", []))


def answering(name: str, elicited: list[str]) -> Any:
    async def elicit(context: Any, params: Any) -> ElicitResult:
        elicited.append(name)
        return ElicitResult(action="accept", content={"colour": f"{name}-secret-colour"})

    return elicit


@pytest.mark.parametrize("tool", ["ask_user", "ask_user_on_session"], ids=["post-stream", "get-stream"])
async def test_a_result_an_answered_server_request_went_into_is_never_cached(
    upstreams: dict[str, Any], make_proxy: StartProxy, tool: str
) -> None:
    """alice answers the upstream's elicitation (on her call's stream, or on her session's GET
    stream) during a tool call the policy caches: bob's identical call is asked himself and gets his
    own answer, never alice's; a call without server requests is still cached."""
    running = await make_proxy(upstreams, policies={"acme": {"tools": {"cache_ttl_seconds": ASKING_TOOLS}}})
    elicited: list[str] = []
    answers = {}
    for name, mode in (("alice", "legacy"), ("bob", "legacy"), ("carol", "auto")):
        if mode == "auto" and tool == "ask_user_on_session":
            continue  # the 2026-07-28 era has no session stream to ask on
        token = running.token("acme", name)
        async with client_for(running.url, token, mode, elicitation_callback=answering(name, elicited)) as c:
            answers[name] = json.loads(text_of(await c.call_tool(tool, {"topic": "pin"})))["colour"]
            await c.call_tool("whoami", {})
    assert answers == {name: f"{name}-secret-colour" for name in answers}
    assert elicited == list(answers)
    cache = running.app[SERVICES].cache
    assert isinstance(cache, ResponseCache)
    assert {key[5] for key, _ in cache.entries()} == {"whoami"}
    assert not any(b"secret-colour" in entry.result for _, entry in cache.entries())


async def test_a_call_waiting_for_another_users_asked_call_is_not_kept_waiting_for_it(
    upstreams: dict[str, Any], make_proxy: StartProxy
) -> None:
    """bob's identical call joins alice's flight; once the upstream asks alice something, her
    result will not be stored, so bob goes upstream at once and is asked himself (alice answers
    only after bob was asked: were bob kept waiting for her flight, neither would finish)."""
    running = await make_proxy(upstreams, policies={"acme": {"tools": {"cache_ttl_seconds": ASKING_TOOLS}}})
    bob_asked = asyncio.Event()

    async def alice_answers(context: Any, params: Any) -> ElicitResult:
        await bob_asked.wait()
        return ElicitResult(action="accept", content={"colour": "alice-secret-colour"})

    async def bob_answers(context: Any, params: Any) -> ElicitResult:
        bob_asked.set()
        return ElicitResult(action="accept", content={"colour": "bob-secret-colour"})

    async def ask(name: str, answer: Any) -> str:
        token = running.token("acme", name)
        async with client_for(running.url, token, "legacy", elicitation_callback=answer) as client:
            return str(json.loads(text_of(await client.call_tool("ask_user", {"topic": "pin"})))["colour"])

    async with asyncio.timeout(30):
        alice = asyncio.create_task(ask("alice", alice_answers))
        async with asyncio.timeout(10):
            while not any("ask_user" in r.text for r in upstreams["acme"].recorder.snapshot()):
                await asyncio.sleep(0.01)  # alice's call leads the flight
        bob = await ask("bob", bob_answers)
        assert (await alice, bob) == ("alice-secret-colour", "bob-secret-colour")
