"""Scale-out (state.backend: redis): two proxy replicas on different ports share one real
redis-server, in front of the tenants' own SDK upstreams (each with its canary).

What one replica did, the other sees: a session created on A continues on B for its owner only, a
result A cached for a tenant is served by B to that tenant only, a tenant's rate and concurrency
limits hold across both, and audit records of both land in the tenant's own stream. Redis stopped
mid-test: sessions are not found (never someone else's), initialize is refused (503), stateless
traffic is still served, /readyz and /metrics say so; when Redis returns, so does everything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis_asyncio
import yaml
from aiohttp import web

from proxy.backends.redis.sessions import RedisSessionRegistry
from proxy.config import ProxyConfig
from proxy.demo import client_for
from proxy.http.keys import SERVICES
from proxy.http.server import start_server
from proxy.layers.containment.request_state import RequestState
from proxy.runtime import Services
from proxy.types import TenantContext
from tests.conftest import MCP_ACCEPT, TENANTS, RunningProxy, proxy_config
from tests.factories import RsaKeys, token
from tests.redis_server import RedisServer, started_redis_server
from tests.upstreams import free_port

pytestmark = pytest.mark.e2e

PUBLIC = "http://mcp.example.test/mcp"  # what both replicas stand for behind the load balancer
HANDSHAKE = "2025-11-25"
MODERN = "2026-07-28"
INITIALIZE: dict[str, Any] = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientCapabilities": {},
}


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    yield from started_redis_server()


@dataclass
class Replica:
    url: str
    app: web.Application

    @property
    def services(self) -> Services:
        return self.app[SERVICES]

    @property
    def metrics_url(self) -> str:
        """/metrics on the replica's own metrics listener."""
        from proxy.http.keys import METRICS_LISTENER

        return f"http://127.0.0.1:{self.app[METRICS_LISTENER].port}/metrics"


async def written(replica: Replica) -> None:
    """Wait until every write the replica has sent to Redis in the background has completed."""
    shared = replica.services.shared
    assert shared is not None
    shared.flush_deferred()
    await shared.written()


def as_bytes(reply: object) -> bytes:
    """A reply of a client made without decode_responses: redis-py types it bytes | str, it is bytes."""
    assert isinstance(reply, bytes), reply
    return reply


@dataclass
class Replicas:
    a: Replica
    b: Replica
    prefix: str
    redis: RedisServer

    @staticmethod
    def token(tenant: str = "acme", sub: str = "alice") -> str:
        return token(tenant=tenant, sub=sub, aud=PUBLIC)

    async def keys(self) -> dict[str, bytes]:
        """Every key under this test's prefix, with a readable rendering of its value."""
        client = redis_asyncio.Redis.from_url(self.redis.url)
        try:
            found: dict[str, bytes] = {}
            async for raw in client.scan_iter(match=f"{self.prefix}:*"):
                key = as_bytes(raw).decode()
                kind = as_bytes(await client.type(key)).decode()
                if kind == "string":
                    value = as_bytes(await client.get(key) or b"")
                elif kind == "hash":
                    fields = (await client.hgetall(key)).items()
                    value = json.dumps(
                        {as_bytes(k).decode(): as_bytes(v).decode("latin-1") for k, v in fields}
                    ).encode()
                elif kind == "zset":
                    value = b" ".join(as_bytes(member) for member in await client.zrange(key, 0, -1))
                elif kind == "set":
                    value = b" ".join(sorted(as_bytes(member) for member in await client.smembers(key)))
                elif kind == "stream":
                    value = b"\n".join(as_bytes(f[b"record"]) for _, f in await client.xrange(key) or [] if f)
                else:
                    value = b""
                found[key] = value
            return found
        finally:
            await client.aclose()


StartReplicas = Callable[..., Awaitable[Replicas]]


@pytest.fixture
async def start_replicas(
    tmp_path: Path, rsa_keys: RsaKeys, redis_server: RedisServer
) -> AsyncIterator[StartReplicas]:
    runners: list[web.AppRunner] = []

    async def start(
        upstreams: dict[str, Any], policies: dict[str, dict[str, Any]] | None = None, **overrides: Any
    ) -> Replicas:
        prefix = f"t{secrets.token_hex(4)}"
        replicas = []
        for name in ("a", "b"):
            data = proxy_config(PUBLIC, upstreams, tmp_path, rsa_keys, **overrides)
            port = free_port()
            data["listen"].update(host="127.0.0.1", port=port, path="/mcp")
            data["state"] = {"backend": "redis", "url": redis_server.url, "key_prefix": prefix}
            if policies:
                policy_dir = tmp_path / f"policies-{name}"
                policy_dir.mkdir(exist_ok=True)
                data["policies_dir"] = str(policy_dir)
                for tenant, policy in policies.items():
                    (policy_dir / f"{tenant}.yaml").write_text(yaml.safe_dump(policy))
                    data["tenants"][tenant]["policy"] = tenant
            runner, _ = await start_server(ProxyConfig.model_validate(data, context={}))
            runners.append(runner)
            replicas.append(Replica(f"http://127.0.0.1:{port}/mcp", runner.app))
        return Replicas(replicas[0], replicas[1], prefix, redis_server)

    try:
        yield start
    finally:
        for runner in runners:
            await runner.cleanup()


# --- raw HTTP, so a test says which replica gets each request -------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def message(self) -> dict[str, Any]:
        """The JSON-RPC answer, whether it came as JSON or as the last SSE event carrying one."""
        if self.headers.get("Content-Type", "").startswith("text/event-stream"):
            answers = [
                json.loads(line[5:])
                for line in self.body.decode().splitlines()
                if line.startswith("data:") and line[5:].strip()
            ]
            return next(a for a in reversed(answers) if "result" in a or "error" in a)
        loaded: dict[str, Any] = json.loads(self.body)
        return loaded


async def post(
    url: str, body: dict[str, Any], bearer: str, session: str | None = None, version: str | None = None
) -> Answer:
    headers = {"Accept": MCP_ACCEPT, "Content-Type": "application/json", "Authorization": f"Bearer {bearer}"}
    if session is not None:
        headers["Mcp-Session-Id"] = session
    if version is not None:
        headers["MCP-Protocol-Version"] = version
    if version == MODERN:  # the 2026-07-28 routing headers mirror the body
        headers["Mcp-Method"] = body["method"]
        headers["Mcp-Name"] = body["params"]["name"]
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as response:
        return Answer(response.status, dict(response.headers), await response.read())


async def initialize(url: str, bearer: str, capabilities: dict[str, Any] | None = None) -> str:
    body = INITIALIZE
    if capabilities is not None:
        body = {**INITIALIZE, "params": {**INITIALIZE["params"], "capabilities": capabilities}}
    answer = await post(url, body, bearer)
    assert answer.status == 200, answer.body
    session = answer.headers["Mcp-Session-Id"]
    done = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert (await post(url, done, bearer, session, HANDSHAKE)).status == 202
    return session


def call(name: str, arguments: dict[str, Any] | None = None, request_id: int = 2) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments or {}},
    }


def modern_call(name: str, arguments: dict[str, Any] | None = None, request_id: int = 2) -> dict[str, Any]:
    body = call(name, arguments, request_id)
    body["params"]["_meta"] = MODERN_META
    return body


def tool_json(answer: Answer) -> dict[str, Any]:
    message = answer.message
    assert "result" in message, message
    result: dict[str, Any] = json.loads(message["result"]["content"][0]["text"])
    return result


def tool_calls(upstream: Any) -> int:
    return sum(1 for r in upstream.recorder.snapshot() if r.method == "POST" and '"tools/call"' in r.text)


# --- a load balancer: POSTs round-robin, a session's GET stream sticky to one replica --------------


class Balancer:
    """What the README asks of the platform's load balancer, in a few lines: any replica for a POST
    or DELETE, the same replica (by Mcp-Session-Id) for a session's GET stream."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = replicas
        self.turn = itertools.count()
        self.served = [0] * len(replicas)
        self.http: aiohttp.ClientSession | None = None

    def pick(self, request: web.Request) -> int:
        if request.method == "GET":
            session = request.headers.get("Mcp-Session-Id", "")
            return sum(session.encode()) % len(self.replicas)
        return next(self.turn) % len(self.replicas)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self.http is not None
        index = self.pick(request)
        self.served[index] += 1
        skip = {"host", "content-length", "transfer-encoding", "connection"}
        headers = {k: v for k, v in request.headers.items() if k.lower() not in skip}
        async with self.http.request(
            request.method, self.replicas[index].url, headers=headers, data=await request.read()
        ) as upstream:
            dropped = {"content-length", "transfer-encoding", "connection", "content-encoding"}
            response = web.StreamResponse(
                status=upstream.status,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in dropped},
            )
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response


@pytest.fixture
async def balancer() -> AsyncIterator[Callable[[Replicas], Awaitable[tuple[str, Balancer]]]]:
    runners: list[web.AppRunner] = []
    balancers: list[Balancer] = []

    async def start(replicas: Replicas) -> tuple[str, Balancer]:
        front = Balancer([replicas.a, replicas.b])
        front.http = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))
        app = web.Application()
        app.router.add_route("*", "/mcp", front.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        balancers.append(front)
        return f"http://127.0.0.1:{port}/mcp", front

    try:
        yield start
    finally:
        for runner in runners:
            await runner.cleanup()
        for front in balancers:
            assert front.http is not None
            await front.http.close()


def text_of(result: Any) -> str:
    return " ".join(getattr(block, "text", "") for block in getattr(result, "content", []))


async def _pick_teal(context: Any, params: Any) -> Any:
    from mcp.types import ElicitResult

    return ElicitResult(action="accept", content={"colour": "teal"})


# --- the tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_the_sdk_client_through_a_round_robin_balancer(
    start_replicas: StartReplicas, balancer: Any, upstreams: dict[str, Any], mode: str
) -> None:
    """Every request may land on either replica: the handshake's session, the elicitation answer
    (legacy) or the sealed request state of the retry (modern) must all be good on the other."""
    replicas = await start_replicas(upstreams)
    url, front = await balancer(replicas)
    for tenant in TENANTS:
        own = upstreams[tenant].canary
        foreign = upstreams[next(t for t in TENANTS if t != tenant)].canary
        async with client_for(url, replicas.token(tenant), mode, elicitation_callback=_pick_teal) as client:
            who = json.loads(text_of(await client.call_tool("whoami", {})))
            assert (who["server_tenant"], who["canary"]) == (tenant, own)
            await client.call_tool("add_note", {"tenant_id": tenant, "text": f"{tenant} plan"})
            notes = text_of(await client.call_tool("list_notes", {"tenant_id": tenant}))
            assert f"{tenant} plan" in notes and own in notes and foreign not in notes
            asked = await client.call_tool("ask_user", {"topic": "kitchen"})
            assert not asked.is_error, text_of(asked)
            assert json.loads(text_of(asked)) == {"topic": "kitchen", "colour": "teal", "canary": own}
    assert min(front.served) >= 4, front.served  # both replicas did real work
    if mode == "legacy":
        assert all(r.services.sessions.shared for r in (replicas.a, replicas.b))


async def test_a_session_created_on_one_replica_continues_on_the_other_for_its_owner_only(
    start_replicas: StartReplicas, upstreams: dict[str, Any]
) -> None:
    replicas = await start_replicas(upstreams)
    a, b = replicas.a.url, replicas.b.url
    alice = replicas.token("acme", "alice")
    session = await initialize(a, alice)

    answer = await post(b, call("whoami"), alice, session, HANDSHAKE)
    assert answer.status == 200
    assert tool_json(answer)["canary"] == upstreams["acme"].canary
    # The upstream saw one session, whichever replica relayed the request.
    upstream_sessions = {
        r.headers.get("mcp-session-id")
        for r in upstreams["acme"].recorder.snapshot()
        if r.method == "POST" and 'initialize"' not in r.text
    }
    assert len(upstream_sessions) == 1 and None not in upstream_sessions
    assert session not in upstream_sessions  # the client only ever holds the proxy's id

    unknown = await post(b, call("whoami"), alice, "x" * len(session), HANDSHAKE)
    for thief in (replicas.token("globex", "alice"), replicas.token("acme", "mallory")):
        for replica in (a, b):
            stolen = await post(replica, call("whoami"), thief, session, HANDSHAKE)
            assert stolen.status == 404
            assert stolen.message["error"] == unknown.message["error"]
    assert tool_calls(upstreams["globex"]) == 0
    assert tool_calls(upstreams["acme"]) == 1
    # Ids naming other keys of the owner's own records (here its set of pending server requests)
    # find nothing either, and do not make Redis look broken to the replica (which would then fail
    # fast for everyone).
    client = redis_asyncio.Redis.from_url(replicas.redis.url)
    try:
        await client.sadd(f"{replicas.prefix}:{{acme}}:session:{session}:pending", "1")
    finally:
        await client.aclose()
    for crafted in (f"{session}:pending", "../sessions", "x" * 20 + ":pending", session + "\u00e9"):
        assert (await post(b, call("whoami"), alice, crafted, HANDSHAKE)).status in (400, 404)
    assert replicas.b.services.shared is not None and replicas.b.services.shared.up
    assert (await post(b, call("whoami", request_id=3), alice, session, HANDSHAKE)).status == 200

    # Ended through B, the session is gone on A as well.
    async with aiohttp.ClientSession() as http:
        headers = {
            "Authorization": f"Bearer {alice}",
            "Mcp-Session-Id": session,
            "MCP-Protocol-Version": HANDSHAKE,
        }
        async with http.delete(b, headers=headers) as ended:
            assert ended.status == 200
    assert (await post(a, call("whoami"), alice, session, HANDSHAKE)).status == 404

    # What Redis holds: the tenant in a fixed position of every key (its hash tag), no token, no
    # client id.
    keys = await replicas.keys()
    assert keys, "the replicas kept nothing in Redis"
    for key, value in keys.items():
        parts = key.split(":")
        assert parts[0] == replicas.prefix
        if key == f"{replicas.prefix}:session-tenants":  # where a sweep looks for orphans
            assert set(value.split()) <= {t.encode() for t in TENANTS}, value
        else:
            assert key == f"{replicas.prefix}:seal-key" or parts[1] in {f"{{{t}}}" for t in TENANTS}, key
        assert alice.encode() not in value
    assert not any(session in key for key in keys)  # deleted, and nothing left behind


async def test_a_result_cached_by_one_replica_is_served_by_the_other_to_the_same_tenant_only(
    start_replicas: StartReplicas, upstreams: dict[str, Any]
) -> None:
    policy = {"tools": {"cache_ttl_seconds": {"whoami": 60}}}
    replicas = await start_replicas(upstreams, policies=dict.fromkeys(TENANTS, policy))
    acme, globex = replicas.token("acme"), replicas.token("globex")

    first = await post(replicas.a.url, modern_call("whoami"), acme, version=MODERN)
    await written(replicas.a)  # the store into Redis completes in the background
    again = await post(replicas.b.url, modern_call("whoami", request_id=7), acme, version=MODERN)
    assert tool_json(first) == tool_json(again)
    assert tool_json(again)["canary"] == upstreams["acme"].canary
    assert again.message["id"] == 7
    assert tool_calls(upstreams["acme"]) == 1  # B answered from what A stored

    other = await post(replicas.b.url, modern_call("whoami"), globex, version=MODERN)
    assert tool_json(other)["canary"] == upstreams["globex"].canary
    assert upstreams["acme"].canary.encode() not in other.body
    assert tool_calls(upstreams["globex"]) == 1

    keys = await replicas.keys()
    cached = {key: value for key, value in keys.items() if key.split(":")[2:3] == ["cache"]}
    assert {key.split(":")[1] for key in cached} == {f"{{{t}}}" for t in TENANTS}
    for key, value in cached.items():
        tenant = key.split(":")[1].strip("{}")
        foreign = next(t for t in TENANTS if t != tenant)
        assert upstreams[tenant].canary.encode() in value
        assert upstreams[foreign].canary.encode() not in value
    client = redis_asyncio.Redis.from_url(replicas.redis.url)
    try:
        ttls = [await client.pttl(key) for key in cached]
    finally:
        await client.aclose()
    assert all(0 < ttl <= 60_000 for ttl in ttls), ttls


async def test_a_tenants_rate_limit_holds_across_both_replicas(
    start_replicas: StartReplicas, upstreams: dict[str, Any]
) -> None:
    replicas = await start_replicas(upstreams, limits={"requests_per_second": 0.05, "burst": 4})
    statuses: dict[str, list[int]] = {tenant: [] for tenant in TENANTS}
    for tenant in TENANTS:
        bearer = replicas.token(tenant)
        for index in range(8):
            replica = (replicas.a, replicas.b)[index % 2]
            answer = await post(replica.url, modern_call("whoami", request_id=index), bearer, version=MODERN)
            statuses[tenant].append(answer.status)
            if answer.status == 429:
                assert answer.message["error"]["data"]["limit"] == "rate"
                assert int(answer.headers["Retry-After"]) >= 1
    # One bucket of 4 for the tenant, not 4 per replica; the other tenant has its own.
    assert statuses == {tenant: [200] * 4 + [429] * 4 for tenant in TENANTS}
    assert tool_calls(upstreams["acme"]) == 4


async def test_a_tenants_concurrency_limit_holds_across_both_replicas(
    start_replicas: StartReplicas, upstreams: dict[str, Any]
) -> None:
    replicas = await start_replicas(upstreams, limits={"max_concurrent": 1})
    acme = replicas.token("acme")
    slow = asyncio.create_task(
        post(replicas.a.url, modern_call("countdown", {"n": 2, "delay": 0.4}), acme, version=MODERN)
    )
    await asyncio.sleep(0.2)
    refused = await post(replicas.b.url, modern_call("whoami"), acme, version=MODERN)
    assert refused.status == 429
    assert refused.message["error"]["data"]["limit"] == "concurrency"
    other = await post(replicas.b.url, modern_call("whoami"), replicas.token("globex"), version=MODERN)
    assert other.status == 200
    assert (await slow).status == 200
    after = await post(replicas.b.url, modern_call("whoami"), acme, version=MODERN)
    assert after.status == 200  # the slot was given back across replicas


async def test_audit_records_of_both_replicas_go_to_the_tenants_own_stream_as_summaries(
    start_replicas: StartReplicas, upstreams: dict[str, Any]
) -> None:
    replicas = await start_replicas(upstreams)
    for tenant in TENANTS:
        bearer = replicas.token(tenant)
        for replica in (replicas.a, replicas.b):
            secret = f"{tenant}-private-text-{replica.url[-9:-4]}"
            body = modern_call("add_note", {"tenant_id": tenant, "text": secret})
            assert (await post(replica.url, body, bearer, version=MODERN)).status == 200
    for replica in (replicas.a, replicas.b):  # batches reach Redis in the background
        replica.services.reports.run_now()
        replica.services.audit._hand_over()
        await written(replica)
    keys = await replicas.keys()
    for tenant in TENANTS:
        stream = keys[f"{replicas.prefix}:{{{tenant}}}:audit"]
        records = [json.loads(line) for line in stream.splitlines()]
        calls = [r for r in records if r.get("method") == "tools/call"]
        assert len(calls) == 2, records  # one from each replica
        assert {r["tenant"] for r in records} == {tenant}
        assert b"private-text" not in stream  # summaries: argument values never reach the log
        assert {r["name"] for r in calls} == {"add_note"}
    assert not [k for k in keys if k.endswith(":audit") and k.split(":")[1].strip("{}") not in TENANTS]


async def test_recent_activity_on_a_replica_includes_its_own_latest_answers(
    start_replicas: StartReplicas, upstreams: dict[str, Any]
) -> None:
    """proxy_recent_activity reads the tenant's stream in Redis; the asking replica's last records
    are written there before the read (commands on different pooled connections are unordered)."""
    policy = {"recent_activity": {"enabled": True, "max_records": 10}}
    replicas = await start_replicas(upstreams, policies=dict.fromkeys(TENANTS, policy))
    bearer = replicas.token("acme")
    for request_id in (2, 3, 4):
        body = modern_call("add_note", {"tenant_id": "acme", "text": "x"}, request_id)
        assert (await post(replicas.a.url, body, bearer, version=MODERN)).status == 200
        asked = modern_call("proxy_recent_activity", {"limit": 10}, request_id + 10)
        answer = await post(replicas.a.url, asked, bearer, version=MODERN)
        records = answer.message["result"]["structuredContent"]["records"]
        assert sum(r["name"] == "add_note" for r in records) == request_id - 1, records


async def test_redis_stopped_mid_test_fails_closed_and_recovers(
    start_replicas: StartReplicas, upstreams: dict[str, Any]
) -> None:
    policy = {"tools": {"cache_ttl_seconds": {"whoami": 60}}}
    replicas = await start_replicas(upstreams, policies=dict.fromkeys(TENANTS, policy))
    a, b = replicas.a.url, replicas.b.url
    alice = replicas.token("acme", "alice")
    session = await initialize(a, alice)
    assert (await post(b, call("whoami"), alice, session, HANDSHAKE)).status == 200

    replicas.redis.stop()
    # A session that cannot be verified is nobody's: 404 on both replicas, even on the one that
    # created it and still holds a local view of it; nothing reaches the upstream.
    before = tool_calls(upstreams["acme"])
    for replica in (a, b):
        lost = await post(replica, call("whoami"), alice, session, HANDSHAKE)
        assert lost.status == 404
        assert lost.message["error"]["code"] == -32004
    assert tool_calls(upstreams["acme"]) == before
    # No new session can be recorded: 503 with a clear error, and no upstream session is left open.
    refused = await post(a, INITIALIZE, alice)
    assert refused.status == 503
    assert refused.message["error"]["code"] == -32013
    assert "Retry-After" in refused.headers
    # Stateless (2026-07-28) traffic is still served, by both replicas, for every tenant.
    for tenant in TENANTS:
        for replica in (a, b):
            served = await post(replica, modern_call("whoami"), replicas.token(tenant), version=MODERN)
            assert served.status == 200
            assert tool_json(served)["canary"] == upstreams[tenant].canary
    async with aiohttp.ClientSession() as http:
        async with http.get(a.replace("/mcp", "/readyz")) as ready:
            body = await ready.json()
            assert ready.status == 200  # reported, not required: this replica still serves
            assert body["state"] == {"backend": "redis", "up": False}
        async with http.get(RunningProxy(a, None, replicas.a.app).metrics_url) as metrics:
            text = await metrics.text()
    assert "mcp_proxy_state_up 0.0" in text
    assert "mcp_proxy_state_errors_total{operation=" in text

    replicas.redis.start()  # the same port, empty (no persistence): as after a crash
    await replicas.a.services.connect()  # what the readiness loop does every check interval
    await replicas.b.services.connect()
    assert (await post(a, call("whoami"), alice, session, HANDSHAKE)).status == 404  # Redis lost it
    fresh = await initialize(b, alice)
    answer = await post(a, call("whoami"), alice, fresh, HANDSHAKE)
    assert answer.status == 200
    assert tool_json(answer)["canary"] == upstreams["acme"].canary
    async with aiohttp.ClientSession() as http:
        async with http.get(b.replace("/mcp", "/readyz")) as ready:
            assert (await ready.json())["state"] == {"backend": "redis", "up": True}
        async with http.get(RunningProxy(b, None, replicas.b.app).metrics_url) as metrics:
            assert "mcp_proxy_state_up 1.0" in await metrics.text()


async def test_request_state_sealed_by_one_replica_opens_on_the_other_for_its_caller_only(
    start_replicas: StartReplicas, upstreams: dict[str, Any]
) -> None:
    replicas = await start_replicas(upstreams)
    a, b = replicas.a.services.request_states, replicas.b.services.request_states
    assert a.shared and b.shared
    state = RequestState("tools/call", "book", "upstream-state-1")
    caller = TenantContext("acme", "alice", "dev", frozenset(), 0.0)
    sealed = a.seal(caller, state)
    assert b.open(caller, "tools/call", "book", sealed) == state
    assert b.open(dataclasses.replace(caller, tenant="globex"), "tools/call", "book", sealed) is None
    assert b.open(dataclasses.replace(caller, subject="mallory"), "tools/call", "book", sealed) is None


async def test_shared_sessions_expire_in_redis_cap_across_replicas_and_local_views_follow(
    redis_server: RedisServer,
) -> None:
    """The registries themselves, two of them (two replicas) on one Redis."""
    import time

    from proxy.backends.redis.client import RedisState
    from proxy.backends.redis.sessions import RedisSessionRegistry
    from proxy.config import StateConfig
    from proxy.ops.metrics import Metrics
    from proxy.protocol.errors import SessionNotFound, TooManyRequests
    from proxy.types import TenantContext

    config = StateConfig(backend="redis", url=redis_server.url, key_prefix=f"t{secrets.token_hex(4)}")
    states = [RedisState(config, Metrics(), "test") for _ in range(2)]
    one, two = (RedisSessionRegistry(state, idle_timeout_seconds=0.6, max_per_tenant=2) for state in states)

    def ctx(tenant: str = "acme", subject: str = "alice") -> TenantContext:
        return TenantContext(tenant, subject, "dev", frozenset(), time.time() + 600)

    async def new(registry: RedisSessionRegistry, who: TenantContext) -> Any:
        return await registry.create(who, HANDSHAKE, "up-1", await registry.reserve(who))

    try:
        first = await new(one, ctx())
        seen = await two.lookup(first.id, ctx())
        assert (seen.tenant, seen.subject, seen.upstream_session_id) == ("acme", ctx().principal, "up-1")
        with pytest.raises(SessionNotFound):
            await two.lookup(first.id, ctx("globex"))
        with pytest.raises(SessionNotFound):
            await two.lookup(first.id, ctx("acme", "mallory"))

        await new(two, ctx("acme", "bob"))  # the cap (2) counts both replicas' sessions
        with pytest.raises(TooManyRequests):
            await one.reserve(ctx("acme", "carol"))
        await new(one, ctx("globex"))  # another tenant's cap is its own

        await two.remove(seen)  # ended (upstream too) through the other replica
        assert first not in await one.expired()  # so this replica's view of it only goes
        assert first.closed and one.count("acme") == 0
        third = await new(one, ctx("acme", "carol"))  # its place under the cap is free again

        await asyncio.sleep(0.9)  # nobody uses it: Redis lets it go after the idle timeout
        with pytest.raises(SessionNotFound):
            await two.lookup(third.id, ctx("acme", "carol"))
        assert third in await one.expired()  # to be ended upstream by this replica alone
        assert third not in await two.expired() and third not in await one.expired()
    finally:
        for state in states:
            await state.close()


async def test_a_dead_replicas_sessions_are_ended_upstream_once_by_whichever_replica_sweeps(
    redis_server: RedisServer,
) -> None:
    """Orphans: a replica dies holding sessions (and an initialize's reservation); after the idle
    timeout the survivors' sweeps find them, and exactly one of them gets each to end upstream."""
    import time

    from proxy.backends.redis.client import RedisState
    from proxy.backends.redis.sessions import RedisSessionRegistry
    from proxy.config import StateConfig
    from proxy.ops.metrics import Metrics
    from proxy.types import TenantContext

    config = StateConfig(backend="redis", url=redis_server.url, key_prefix=f"t{secrets.token_hex(4)}")
    states = [RedisState(config, Metrics(), "test") for _ in range(3)]
    dead, one, two = (RedisSessionRegistry(s, idle_timeout_seconds=0.5, max_per_tenant=3) for s in states)
    for registry in (one, two):
        registry.clock_margin_seconds = 0.0

    def ctx(tenant: str, subject: str = "alice") -> TenantContext:
        return TenantContext(tenant, subject, "dev", frozenset(), time.time() + 600)

    try:
        lost = await dead.create(ctx("acme"), HANDSHAKE, "up-acme", await dead.reserve(ctx("acme")))
        other = await dead.create(ctx("globex"), HANDSHAKE, None, await dead.reserve(ctx("globex")))
        await dead.reserve(ctx("acme", "bob"))  # an initialize that died with its replica
        await states[0].close()  # the replica is gone: nobody holds these sessions
        assert await one.expired() == [] and await two.expired() == []  # not idle yet: nothing

        await asyncio.sleep(0.7)
        ended = [*(await one.expired()), *(await two.expired())]
        assert sorted((s.id, s.tenant, s.upstream_session_id) for s in ended) == sorted(
            [(lost.id, "acme", "up-acme"), (other.id, "globex", None)]
        )
        assert next(s for s in ended if s.id == lost.id).protocol_version == HANDSHAKE
        assert await one.expired() == [] and await two.expired() == []  # each once only
        # Nothing of them is left, and the tenant's whole cap is free again.
        client = redis_asyncio.Redis.from_url(redis_server.url)
        try:
            assert await client.zcard(f"{config.key_prefix}:acme:sessions") == 0
            assert await client.hlen(f"{config.key_prefix}:acme:upstream-sessions") == 0
        finally:
            await client.aclose()
        for subject in ("carol", "dave", "erin"):
            await one.reserve(ctx("acme", subject))
    finally:
        for state in states[1:]:
            await state.close()


async def test_a_slot_whose_release_missed_redis_is_given_back_with_the_next_admission(
    redis_server: RedisServer,
) -> None:
    """Redis stalls as requests finish: their slots are owed, not held for STALE_SECONDS."""
    from proxy.backends.redis.client import RedisState
    from proxy.backends.redis.limits import RedisLimiter
    from proxy.config import LimitsConfig, StateConfig
    from proxy.ops.metrics import Metrics
    from proxy.protocol.errors import TooManyRequests

    config = StateConfig(backend="redis", url=redis_server.url, key_prefix=f"t{secrets.token_hex(4)}")
    state = RedisState(config, Metrics(), "test")
    limiter = RedisLimiter(state)
    limits = LimitsConfig(max_concurrent=2)
    inflight = state.key("acme", "inflight")
    try:
        held = [await limiter.admit("acme", limits) for _ in range(2)]
        with pytest.raises(TooManyRequests):
            await limiter.admit("acme", limits)
        real_pipeline = state.client.pipeline

        def failing_pipeline(*args: Any, **kwargs: Any) -> Any:
            pipeline = real_pipeline(*args, **kwargs)

            async def stalled() -> None:
                raise redis_asyncio.ConnectionError("stalled")

            pipeline.execute = stalled
            return pipeline

        state.client.pipeline = failing_pipeline
        for admission in held:
            limiter.release("acme", admission)
        await asyncio.sleep(0.1)  # the deferred release went out, and failed
        state.client.pipeline = real_pipeline
        await asyncio.sleep(1.1)  # RETRY_SECONDS: Redis is tried again
        assert await state.client.zcard(inflight) == 2  # Redis still counts both
        again = await limiter.admit("acme", limits)  # ... until this admission gives them back
        assert await state.client.zcard(inflight) == 1
        limiter.release("acme", again)
        await asyncio.sleep(0.1)
        assert await state.client.zcard(inflight) == 0
    finally:
        await state.close()


async def test_a_long_requested_version_never_reaches_redis_and_replicas_see_the_negotiated_one(
    start_replicas: StartReplicas, upstreams: dict[str, Any]
) -> None:
    replicas = await start_replicas(upstreams)
    acme = replicas.token("acme")
    odd = "2025-11-25-" + "x" * 20_000  # a version nobody speaks: the server answers with its own
    body = {**INITIALIZE, "params": {**INITIALIZE["params"], "protocolVersion": odd}}
    answer = await post(replicas.a.url, body, acme)
    assert answer.status == 200, answer.body
    negotiated = answer.message["result"]["protocolVersion"]
    assert negotiated in ("2025-03-26", "2025-06-18", "2025-11-25")
    session = answer.headers["Mcp-Session-Id"]
    keys = await replicas.keys()
    record = json.loads(keys[f"{replicas.prefix}:{{acme}}:session:{session}"])
    assert record["protocol_version"] == negotiated
    assert all(len(value) < 2_000 for value in keys.values())  # nothing the client chose, stored whole
    listed = await post(replicas.b.url, call("whoami"), acme, session, negotiated)
    assert listed.status == 200, listed.body
    assert replicas.b.services.sessions.all()[0].protocol_version == negotiated


async def test_a_redis_that_refuses_the_credentials_is_not_ready_with_the_reason(
    tmp_path: Path, rsa_keys: RsaKeys, redis_server: RedisServer, upstreams: dict[str, Any]
) -> None:
    admin = redis_asyncio.Redis.from_url(redis_server.url)
    user = f"proxy-{secrets.token_hex(3)}"
    await admin.acl_setuser(user, enabled=True, passwords="+right-password", keys=["*"], categories=["+@all"])
    host_port = redis_server.url.split("//", 1)[1]
    data = proxy_config(PUBLIC, upstreams, tmp_path, rsa_keys)
    data["listen"].update(host="127.0.0.1", port=free_port(), path="/mcp")
    data["readiness"] = {"upstreams": "ignore", "check_interval_seconds": 0.1}
    data["state"] = {
        "backend": "redis",
        "url": f"redis://{user}:wrong-password@{host_port}",
        "key_prefix": "pw",
    }
    runner, port = await start_server(ProxyConfig.model_validate(data, context={}))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/readyz") as ready:
                assert ready.status == 503
                state = (await ready.json())["state"]
            assert state["up"] is False and "credentials" in state["problem"]
        answer = await post(
            f"http://127.0.0.1:{port}/mcp", INITIALIZE, token(tenant="acme", sub="a", aud=PUBLIC)
        )
        assert answer.status == 503  # no session can be created: the store refuses us
    finally:
        await runner.cleanup()
        await admin.acl_deluser(user)
        await admin.aclose()


async def test_a_killed_replicas_session_is_ended_upstream_by_a_surviving_replica(
    start_replicas: StartReplicas, upstreams: dict[str, Any], tmp_path: Path, rsa_keys: RsaKeys
) -> None:
    """SIGKILL: the replica holding a session dies without ending it; once the session has been idle
    past the timeout a surviving replica's sweep ends it upstream, exactly once."""
    from tests.adversarial.proxy_process import ProxyProcess

    sessions = {"idle_timeout_seconds": 1.0}
    replicas = await start_replicas(upstreams, sessions=sessions)
    for replica in (replicas.a, replicas.b):
        assert isinstance(replica.services.sessions, RedisSessionRegistry)
        replica.services.sessions.clock_margin_seconds = 0.0
    port = free_port()
    data = proxy_config(PUBLIC, upstreams, tmp_path, rsa_keys, sessions=sessions)
    data["listen"].update(host="127.0.0.1", port=port, path="/mcp")
    data["state"] = {"backend": "redis", "url": replicas.redis.url, "key_prefix": replicas.prefix}
    (tmp_path / "doomed.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(data))))
    doomed = ProxyProcess(tmp_path / "doomed.yaml", tmp_path / "doomed.stderr", port)
    doomed.start()
    recorder = upstreams["acme"].recorder
    try:
        alice = replicas.token("acme", "alice")
        session = await initialize(doomed.url, alice)
        assert (await post(doomed.url, call("whoami"), alice, session, HANDSHAKE)).status == 200
        upstream_id = next(
            r.headers["mcp-session-id"] for r in recorder.snapshot() if "mcp-session-id" in r.headers
        )
        assert doomed.process is not None
        doomed.process.kill()
        doomed.process.wait(10)

        def ends() -> list[Any]:
            return [
                r
                for r in recorder.snapshot()
                if r.method == "DELETE" and r.headers.get("mcp-session-id") == upstream_id
            ]

        deadline = asyncio.get_running_loop().time() + 30
        while not ends():
            assert asyncio.get_running_loop().time() < deadline, "the orphan was never ended upstream"
            await asyncio.sleep(0.1)
        for replica in (replicas.a, replicas.b):  # every replica's next sweep has run: still once
            assert isinstance(replica.services.sessions, RedisSessionRegistry)
            replica.services.sessions.clock_margin_seconds = 0.0
            assert await replica.services.sessions.expired() == []
        assert len(ends()) == 1
        assert (await post(replicas.a.url, call("whoami"), alice, session, HANDSHAKE)).status == 404
    finally:
        doomed.stop()


async def _ask_and_read(
    url: str, bearer: str, session: str, on_request: Callable[[dict[str, Any]], Awaitable[None]]
) -> dict[str, Any]:
    """tools/call ask_user on `url` as a stream: each server request on it goes to `on_request`
    while the stream stays open; returns the call's answer."""
    headers = {
        "Accept": MCP_ACCEPT,
        "Content-Type": "application/json",
        "Authorization": f"Bearer {bearer}",
        "Mcp-Session-Id": session,
        "MCP-Protocol-Version": HANDSHAKE,
    }
    body = call("ask_user", {"topic": "kitchen"}, request_id=9)
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as response:
        assert response.status == 200
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or not line[5:].strip():
                continue
            message = json.loads(line[5:])
            if "method" in message and "id" in message:
                await on_request(message)
            elif message.get("id") == 9:
                return dict(message)
    raise AssertionError("the stream ended without the call's answer")


async def test_an_answer_to_a_server_request_is_good_on_the_other_replica_however_slow_redis_is(
    start_replicas: StartReplicas, upstreams: dict[str, Any]
) -> None:
    """The replica relaying a server request records that an answer is owed (in Redis) before the
    request leaves: with that write slowed, the client's answer reaching the other replica at once
    still finds it, and the upstream's call completes."""
    replicas = await start_replicas(upstreams)
    shared = replicas.a.services.shared
    assert shared is not None
    original = shared.call

    async def slowed(operation: str, awaitable: Awaitable[Any]) -> Any:
        if operation == "session_expect_answer":
            await asyncio.sleep(0.3)
        return await original(operation, awaitable)

    shared.call = slowed  # type: ignore[method-assign]
    alice = replicas.token("acme", "alice")
    session = await initialize(replicas.a.url, alice, {"elicitation": {"form": {}}})
    answered: list[int] = []

    async def answer_on_b(request: dict[str, Any]) -> None:
        assert request["method"] == "elicitation/create"
        reply = {
            "jsonrpc": "2.0",
            "id": request["id"],
            "result": {"action": "accept", "content": {"colour": "teal"}},
        }
        answered.append((await post(replicas.b.url, reply, alice, session, HANDSHAKE)).status)

    result = await asyncio.wait_for(_ask_and_read(replicas.a.url, alice, session, answer_on_b), 60)
    assert answered == [202], result
    assert json.loads(result["result"]["content"][0]["text"])["colour"] == "teal"


async def test_an_upstream_waiting_for_an_answer_that_never_comes_gets_an_error_in_time(
    start_replicas: StartReplicas, upstreams: dict[str, Any]
) -> None:
    """sessions.answer_timeout_seconds bounds the wait: the upstream is told the client did not
    answer (-32001), so its call ends instead of hanging; a late answer is then refused."""
    replicas = await start_replicas(upstreams, sessions={"answer_timeout_seconds": 0.5})
    alice = replicas.token("acme", "alice")
    session = await initialize(replicas.a.url, alice, {"elicitation": {"form": {}}})
    asked: list[dict[str, Any]] = []

    async def never_answer(request: dict[str, Any]) -> None:
        asked.append(request)

    result = await asyncio.wait_for(_ask_and_read(replicas.a.url, alice, session, never_answer), 60)
    assert [r["method"] for r in asked] == ["elicitation/create"]
    told = [
        json.loads(r.text)
        for r in upstreams["acme"].recorder.snapshot()
        if r.method == "POST" and '"error"' in r.text
    ]
    assert [(m["id"], m["error"]["code"]) for m in told] == [(asked[0]["id"], -32001)]
    assert "error" in result or result["result"].get("isError"), result
    late = {"jsonrpc": "2.0", "id": asked[0]["id"], "result": {"action": "cancel"}}
    for replica in (replicas.a, replicas.b):
        assert (await post(replica.url, late, alice, session, HANDSHAKE)).status == 400
