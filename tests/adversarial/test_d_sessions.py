"""THREATS D, end to end: what belongs to one handshake-era session stays with it.

Server-to-client requests (sampling, elicitation) and notifications (progress, log messages on the
request's stream and on the session's own GET stream) reach only the session whose upstream
session sent them, even when several sessions of the same tenant and user are busy at once; an
answer can only be posted by the session that was asked. Abandoned sessions expire on both sides,
and a tenant's sessions are capped without touching other tenants.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from mcp_types import CreateMessageResult, ElicitResult, TextContent

from proxy.http.keys import SERVICES
from tests.conftest import MCP_ACCEPT, RunningProxy, StartProxy
from tests.e2e.test_transport_e2e import error_of, initialize, session_headers, sse_messages, text_of
from tests.upstreams import TOOL_EVENTS, Upstream, start_test_upstream

pytestmark = pytest.mark.e2e

OWN_TENANTS = ("acme", "globex")


@pytest.fixture(scope="module")
def own_upstreams(upstream_runner: Any) -> dict[str, Upstream]:
    """acme and globex, each with the notification tool (the shared fixtures' servers lack it)."""
    return {
        tenant: start_test_upstream(upstream_runner, tenant, f"CANARY-{tenant}-{secrets.token_hex(6)}")
        for tenant in OWN_TENANTS
    }


@pytest.fixture
async def owner_proxy(own_upstreams: dict[str, Upstream], make_proxy: StartProxy) -> RunningProxy:
    for upstream in own_upstreams.values():
        upstream.recorder.clear()
    return await make_proxy(own_upstreams)


@contextlib.asynccontextmanager
async def sdk_client(url: str, token: str, mode: str, **options: Any) -> AsyncIterator[Any]:
    """The real SDK client (as proxy.demo.client_for builds it) whose HTTP connections close with it."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30)
    async with http, Client(streamable_http_client(url, http_client=http), mode=mode, **options) as client:
        yield client


def mcp_errors(error: BaseException) -> list[Any]:
    """The MCPErrors inside an exception (the SDK client wraps them in exception groups)."""
    from mcp.shared.exceptions import MCPError

    if isinstance(error, MCPError):
        return [error]
    if isinstance(error, BaseExceptionGroup):
        return [found for inner in error.exceptions for found in mcp_errors(inner)]
    return []


async def wait_until(predicate: Callable[[], bool], timeout: float = 60.0) -> bool:
    """True as soon as `predicate` holds; generous, so a loaded machine only makes it slower."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


# --- server-to-client requests and notifications, through the real SDK client --------------------


@dataclass
class Party:
    """One SDK client (one session) and everything the server sent it."""

    name: str
    tenant: str
    subject: str
    marker: str = field(default_factory=lambda: f"mark-{secrets.token_hex(5)}")
    sampled: list[str] = field(default_factory=list)
    elicited: list[str] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    progress: list[str] = field(default_factory=list)

    def everything(self) -> str:
        return json.dumps([self.sampled, self.elicited, self.logs, self.progress])


def party_client(proxy: RunningProxy, party: Party, together: asyncio.Barrier) -> Any:
    async def sample(context: Any, params: Any) -> CreateMessageResult:
        prompt = params.messages[0].content.text
        party.sampled.append(prompt)
        if len(party.sampled) == 1:
            # Every party's first sampling request is pending at the same time before any is answered.
            async with asyncio.timeout(10):
                await together.wait()
        return CreateMessageResult(
            role="assistant",
            content=TextContent(type="text", text=f"{party.name} answers: {prompt}"),
            model=f"model-{party.name}",
        )

    async def elicit(context: Any, params: Any) -> ElicitResult:
        party.elicited.append(params.message)
        return ElicitResult(action="accept", content={"colour": f"{party.name}-{params.message[-10:]}"})

    async def on_log(params: Any) -> None:
        party.logs.append(str(params.data))

    return sdk_client(
        proxy.url,
        proxy.token(party.tenant, party.subject),
        "legacy",
        sampling_callback=sample,
        elicitation_callback=elicit,
        logging_callback=on_log,
    )


async def run_party(proxy: RunningProxy, party: Party, together: asyncio.Barrier) -> list[Any]:
    results: list[Any] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        party.progress.append(message or "")

    async with party_client(proxy, party, together) as client:
        for round_ in range(2):
            topic = f"{party.marker}-{round_}"
            results.append(json.loads(text_of(await client.call_tool("ask_model", {"topic": topic}))))
            results.append(json.loads(text_of(await client.call_tool("ask_user", {"topic": topic}))))
        # The session-scoped log message rides the GET stream, which the SDK opens in the
        # background: announce until it has arrived (its absence fails below, never a foreign one).
        deadline = time.monotonic() + 5
        while True:
            answer = await client.call_tool(
                "announce", {"marker": party.marker}, progress_callback=on_progress
            )
            results.append(json.loads(text_of(answer)))
            if f"session-log {party.marker}" in party.logs or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    return results


async def test_server_requests_and_notifications_reach_only_their_own_session(
    owner_proxy: RunningProxy, own_upstreams: dict[str, Upstream]
) -> None:
    # Two sessions of the same tenant and user, one of the same tenant and another user, one of
    # another tenant: all four at once.
    parties = [
        Party("a1", "acme", "alice"),
        Party("a2", "acme", "alice"),
        Party("a3", "acme", "bob"),
        Party("g1", "globex", "alice"),
    ]
    together = asyncio.Barrier(len(parties))
    outcomes = await asyncio.gather(*(run_party(owner_proxy, p, together) for p in parties))

    for party, results in zip(parties, outcomes, strict=True):
        canary = own_upstreams[party.tenant].canary
        # Each callback was asked only its own session's questions, once per call.
        assert party.sampled == [f"Say something about {party.marker}-{r}" for r in range(2)]
        assert party.elicited == [f"Pick a colour for {party.marker}-{r}" for r in range(2)]
        # ... and its answers went back to its own upstream session.
        sampled = [r for r in results if "model" in r]
        assert [r["model"] for r in sampled] == [f"model-{party.name}"] * 2
        assert [r["text"] for r in sampled] == [
            f"{party.name} answers: Say something about {party.marker}-{r}" for r in range(2)
        ]
        colours = [r["colour"] for r in results if "colour" in r]
        assert all(c.startswith(f"{party.name}-") for c in colours) and len(colours) == 2
        assert all(r.get("canary", canary) == canary for r in results)
        # Notifications: progress and the request's log on its stream, the session log on GET.
        announced = [r for r in results if "marker" in r]
        assert announced and all(r["marker"] == party.marker for r in announced)
        assert party.progress == [f"progress {party.marker}"] * len(announced)
        assert party.logs.count(f"request-log {party.marker}") == len(announced)
        assert f"session-log {party.marker}" in party.logs
        assert set(party.logs) <= {f"request-log {party.marker}", f"session-log {party.marker}"}
        for other in parties:
            if other is not party:
                assert other.marker not in party.everything()
                assert f"model-{other.name}" not in json.dumps(results)
    assert len(owner_proxy.app[SERVICES].sessions) == 0  # every client ended its session


# --- answers to server requests: only the asked session may post them -----------------------------


def _auth(proxy: RunningProxy, token: str, session_id: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token}",
        "Accept": MCP_ACCEPT,
        "Content-Type": "application/json",
        **session_headers(session_id),
    }


@dataclass
class OpenCall:
    """A tools/call ask_model on a raw session, stopped at the server's sampling request."""

    session_id: str
    topic: str
    response: aiohttp.ClientResponse
    events: Any
    server_request: dict[str, Any]


async def open_ask_model(
    http: aiohttp.ClientSession, proxy: RunningProxy, token: str, session_id: str, topic: str, call_id: int
) -> OpenCall:
    body = {
        "jsonrpc": "2.0",
        "id": call_id,
        "method": "tools/call",
        "params": {"name": "ask_model", "arguments": {"topic": topic}},
    }
    response = await http.post(proxy.url, data=json.dumps(body), headers=_auth(proxy, token, session_id))
    assert response.status == 200
    events = sse_messages(response)
    server_request = await asyncio.wait_for(anext(events), 5)
    assert server_request["method"] == "sampling/createMessage"
    assert topic in server_request["params"]["messages"][0]["content"]["text"]
    return OpenCall(session_id, topic, response, events, server_request)


def sampling_answer(request_id: Any, text: str) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "result": {"role": "assistant", "model": "raw", "content": {"type": "text", "text": text}},
    }


def upstream_answers(upstream: Upstream) -> list[tuple[str, dict[str, Any]]]:
    """(upstream session id, message) of every JSON-RPC response the upstream received."""
    out = []
    for record in upstream.recorder.snapshot():
        if record.method == "POST":
            message = json.loads(record.text)
            if "method" not in message:
                out.append((record.headers.get("mcp-session-id", ""), message))
    return out


def upstream_session_of(upstream: Upstream, topic: str) -> str:
    """The upstream session id the tools/call about `topic` arrived on."""
    for record in upstream.recorder.snapshot():
        if record.method == "POST" and topic in record.text and '"tools/call"' in record.text:
            return record.headers["mcp-session-id"]
    raise AssertionError(f"no tools/call about {topic} reached the upstream")


async def test_an_answer_with_another_sessions_server_request_id_is_refused(
    owner_proxy: RunningProxy, own_upstreams: dict[str, Upstream]
) -> None:
    proxy, acme = owner_proxy, own_upstreams["acme"]
    alice = proxy.token("acme", "alice")
    owner = await initialize(proxy, alice, {"sampling": {}})
    sibling = await initialize(proxy, alice, {"sampling": {}})  # same tenant, same user
    colleague_token = proxy.token("acme", "bob")
    colleague = await initialize(proxy, colleague_token, {"sampling": {}})
    stranger_token = proxy.token("globex", "alice")
    stranger = await initialize(proxy, stranger_token, {"sampling": {}})
    async with aiohttp.ClientSession() as http:
        # The owner has two server requests pending, the sibling one: upstream ids may repeat
        # between sessions, so pick one only the owner was sent.
        owner_calls = [
            await open_ask_model(http, proxy, alice, owner, f"owner-{i}-{secrets.token_hex(3)}", 10 + i)
            for i in range(2)
        ]
        sibling_call = await open_ask_model(
            http, proxy, alice, sibling, f"sibling-{secrets.token_hex(3)}", 10
        )
        try:
            owner_ids = [c.server_request["id"] for c in owner_calls]
            only_owners = [i for i in owner_ids if i != sibling_call.server_request["id"]]
            assert only_owners, (owner_ids, sibling_call.server_request)
            stolen = sampling_answer(only_owners[0], "forged by another session")
            for token, session_id in (
                (alice, sibling),
                (colleague_token, colleague),
                (stranger_token, stranger),
            ):
                status, _, body = await proxy.post(stolen, token=token, headers=session_headers(session_id))
                assert status == 400
                error = error_of(body)
                assert error["code"] == -32600
                assert "no pending server request" in error["message"]
            assert upstream_answers(acme) == []
            assert upstream_answers(own_upstreams["globex"]) == []
            # Each session answers its own requests; each call gets its own session's answer.
            for call in [*owner_calls, sibling_call]:
                answer = sampling_answer(call.server_request["id"], f"reply for {call.topic}")
                status, _, body = await proxy.post(
                    answer, token=alice, headers=session_headers(call.session_id)
                )
                assert (status, body) == (202, b"")
            for call in [*owner_calls, sibling_call]:
                final = await asyncio.wait_for(anext(call.events), 5)
                assert json.loads(final["result"]["content"][0]["text"])["text"] == f"reply for {call.topic}"
        finally:
            for call in [*owner_calls, sibling_call]:
                call.response.close()
    forwarded = upstream_answers(acme)
    assert len(forwarded) == 3
    assert "forged by another session" not in json.dumps(forwarded)
    for call in [*owner_calls, sibling_call]:
        (session_id,) = [
            s for s, m in forwarded if m["result"]["content"]["text"] == f"reply for {call.topic}"
        ]
        assert session_id == upstream_session_of(acme, call.topic)


# --- abandoned sessions expire on both sides -------------------------------------------------------


def upstream_session_ids(upstream: Upstream, http_method: str) -> list[str]:
    return [
        r.headers["mcp-session-id"]
        for r in upstream.recorder.snapshot()
        if r.method == http_method and "mcp-session-id" in r.headers
    ]


LIST_TOOLS = {"jsonrpc": "2.0", "id": 7, "method": "tools/list", "params": {}}


async def test_an_abandoned_session_expires_on_both_sides(
    own_upstreams: dict[str, Upstream], make_proxy: StartProxy
) -> None:
    acme = own_upstreams["acme"]
    acme.recorder.clear()
    proxy = await make_proxy(own_upstreams, sessions={"idle_timeout_seconds": 1})
    token = proxy.token("acme")
    abandoned = await initialize(proxy, token)
    kept = await initialize(proxy, token)
    upstream_ids = upstream_session_ids(acme, "POST")  # notifications/initialized of both
    assert len(set(upstream_ids)) == 2
    registry = proxy.app[SERVICES].sessions
    assert registry.count("acme") == 2
    started = time.monotonic()
    # The kept session stays busy; the abandoned one is never used again.
    while not upstream_session_ids(acme, "DELETE") and time.monotonic() - started < 5:
        status, _, _ = await proxy.post(LIST_TOOLS, token=token, headers=session_headers(kept))
        assert status == 200
        await asyncio.sleep(0.3)
    deleted = upstream_session_ids(acme, "DELETE")
    assert len(deleted) == 1, deleted
    assert time.monotonic() - started >= 1.0  # not before the idle timeout
    assert registry.count("acme") == 1
    status, _, body = await proxy.post(LIST_TOOLS, token=token, headers=session_headers(abandoned))
    assert status == 404
    assert error_of(body)["code"] == -32004
    status, _, body = await proxy.post(LIST_TOOLS, token=token, headers=session_headers(kept))
    assert status == 200
    assert "add_note" in body.decode()
    # The upstream session that was ended is the abandoned one, not the kept one.
    kept_upstream = [r for r in acme.recorder.snapshot() if r.method == "POST" and '"tools/list"' in r.text]
    assert deleted[0] != kept_upstream[-1].headers["mcp-session-id"]
    assert deleted[0] in upstream_ids


async def test_a_session_busy_with_a_long_call_does_not_expire_under_it(
    own_upstreams: dict[str, Upstream], make_proxy: StartProxy
) -> None:
    """A call that outlasts the idle timeout is activity, not abandonment."""
    acme = own_upstreams["acme"]
    acme.recorder.clear()
    proxy = await make_proxy(own_upstreams, sessions={"idle_timeout_seconds": 1})
    token = proxy.token("acme")
    session_id = await initialize(proxy, token)
    body = {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "tools/call",
        "params": {"name": "countdown", "arguments": {"n": 5, "delay": 0.5}, "_meta": {"progressToken": "p"}},
    }
    messages = []
    async with (
        aiohttp.ClientSession() as http,
        http.post(proxy.url, data=json.dumps(body), headers=_auth(proxy, token, session_id)) as response,
    ):
        assert response.status == 200
        async for message in sse_messages(response):
            messages.append(message)
    final = messages[-1]
    assert final["id"] == 3
    assert "result" in final, final
    assert final["result"]["structuredContent"]["done"] == 5
    assert upstream_session_ids(acme, "DELETE") == []
    status, _, _ = await proxy.post(LIST_TOOLS, token=token, headers=session_headers(session_id))
    assert status == 200


# --- per-tenant session cap -------------------------------------------------------------------------


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


def initializes(upstream: Upstream) -> int:
    return sum(1 for r in upstream.recorder.snapshot() if r.method == "POST" and '"initialize"' in r.text)


async def test_the_session_cap_refuses_only_the_tenant_at_its_limit(
    own_upstreams: dict[str, Upstream], make_proxy: StartProxy
) -> None:
    for upstream in own_upstreams.values():
        upstream.recorder.clear()
    proxy = await make_proxy(own_upstreams, sessions={"max_per_tenant": 3})
    acme_token = proxy.token("acme")
    acme_sessions = [await initialize(proxy, acme_token) for _ in range(3)]
    status, headers, body = await proxy.post(INITIALIZE, token=acme_token)
    assert status == 429
    assert int(headers["Retry-After"]) > 0
    error = error_of(body)
    assert error["code"] == -32009
    assert "Too many sessions" in error["message"]
    assert "limit" in error["message"]
    assert "Mcp-Session-Id" not in headers
    assert initializes(own_upstreams["acme"]) == 3  # the refused one never reached the upstream
    # Another user of the same tenant counts against the same cap.
    status, _, _ = await proxy.post(INITIALIZE, token=proxy.token("acme", "bob"))
    assert status == 429
    # Another tenant is unaffected, up to its own cap.
    globex_token = proxy.token("globex")
    globex_sessions = [await initialize(proxy, globex_token) for _ in range(3)]
    assert len(set(globex_sessions)) == 3
    status, _, _ = await proxy.post(
        LIST_TOOLS, token=globex_token, headers=session_headers(globex_sessions[0])
    )
    assert status == 200
    # Ending one of acme's sessions makes room for exactly one more.
    async with (
        aiohttp.ClientSession() as http,
        http.delete(
            proxy.url, headers={"Authorization": f"Bearer {acme_token}", **session_headers(acme_sessions[0])}
        ) as response,
    ):
        assert response.status == 200
    await initialize(proxy, acme_token)
    status, _, _ = await proxy.post(INITIALIZE, token=acme_token)
    assert status == 429
    # The real SDK client gets the refusal as its initialize's error.
    with pytest.raises(ExceptionGroup) as refused:
        async with sdk_client(proxy.url, acme_token, "legacy") as client:
            await client.list_tools()
    (error,) = mcp_errors(refused.value)
    assert error.error.code == -32009
    assert error.error.message.startswith("Too many sessions")


async def test_initializes_racing_past_the_cap_leave_no_upstream_session_behind(
    upstream_runner: Any, make_proxy: StartProxy
) -> None:
    """Eight initializes at once against a cap of 3, with an upstream slow enough that all of
    them pass the early check: three sessions, five 429s, and no orphaned upstream session."""
    slow = start_test_upstream(upstream_runner, "acme", "CANARY-slow", post_delay=0.3)
    proxy = await make_proxy({"acme": slow}, sessions={"max_per_tenant": 3})
    token = proxy.token("acme")
    answers = await asyncio.gather(*(proxy.post(INITIALIZE, token=token) for _ in range(8)))
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200] * 3 + [429] * 5
    for status, headers, body in answers:
        if status == 429:
            assert error_of(body)["code"] == -32009
            assert "Retry-After" in headers
    assert len(proxy.app[SERVICES].sessions) == 3
    # Every upstream session the proxy does not keep must have been ended upstream (or never opened).
    assert await wait_until(lambda: initializes(slow) - len(upstream_session_ids(slow, "DELETE")) == 3), (
        f"{initializes(slow)} upstream sessions opened, {len(upstream_session_ids(slow, 'DELETE'))} ended, "
        "3 kept"
    )


# --- resumption: the session's own stream, answer included -----------------------------------------


@pytest.fixture(scope="module")
def resumable_acme(upstream_runner: Any) -> Upstream:
    """acme's notes server with an event store: its streams can be resumed with Last-Event-ID."""
    return start_test_upstream(upstream_runner, "acme", f"CANARY-acme-{secrets.token_hex(6)}", resumable=True)


async def sse_with_ids(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, dict[str, Any] | None]]:
    """(event id, message or None for an event without data) of an SSE response, as they arrive."""
    event_id, data = "", []
    async for raw_line in response.content:
        line = raw_line.decode("utf-8").rstrip("\r\n")
        if line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line:
            text = "\n".join(data)
            yield event_id, json.loads(text) if text else None  # (a priming event has empty data)
            data = []


async def test_a_resumed_stream_delivers_the_answer_of_the_interrupted_call(
    resumable_acme: Upstream, make_proxy: StartProxy
) -> None:
    proxy = await make_proxy({"acme": resumable_acme})
    token = proxy.token("acme")
    session_id = await initialize(proxy, token)
    tag = secrets.token_hex(6)
    body = {
        "jsonrpc": "2.0",
        "id": 41,
        "method": "tools/call",
        "params": {
            "name": "watched_countdown",
            "arguments": {"tag": tag, "n": 3, "delay": 0.2},
            "_meta": {"progressToken": "resume"},
        },
    }
    async with aiohttp.ClientSession() as http:
        # The client loses the call's stream right after the first progress event ...
        response = await http.post(proxy.url, data=json.dumps(body), headers=_auth(proxy, token, session_id))
        assert response.status == 200
        last_id = ""
        try:
            async with asyncio.timeout(5):
                async for event_id, message in sse_with_ids(response):
                    last_id = event_id
                    if message is not None:
                        assert message["method"] == "notifications/progress"
                        break
        finally:
            response.close()
        # ... the tool runs to the end on the upstream session regardless ...
        assert await wait_until(lambda: "finished" in TOOL_EVENTS.get(tag, []))
        # ... and the client resumes from the last event it saw, on its own session.
        resumed: list[dict[str, Any]] = []
        get = {
            "Authorization": f"Bearer {token}",
            "Accept": "text/event-stream",
            "Last-Event-ID": last_id,
            **session_headers(session_id),
        }
        async with http.get(proxy.url, headers=get) as response:
            assert response.status == 200
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    async for _, message in sse_with_ids(response):
                        if message is not None:
                            resumed.append(message)
                            if message.get("id") == 41:
                                break
    assert [m["params"]["progress"] for m in resumed if m.get("method") == "notifications/progress"] == [2, 3]
    assert resumed[-1]["id"] == 41, resumed
    assert resumed[-1]["result"]["structuredContent"] == {"done": 3, "canary": resumable_acme.canary}


# --- another user's (or tenant's) session id on GET and DELETE: exactly an unknown id's answer ------


async def get_and_delete(proxy: RunningProxy, token: str, session_id: str) -> list[tuple[int, str, bytes]]:
    """(status, Content-Type, body) of a GET stream request and of a DELETE with this session id."""
    auth = {"Authorization": f"Bearer {token}", **session_headers(session_id)}
    answers = []
    async with aiohttp.ClientSession() as http:
        for method, extra in (("GET", {"Accept": "text/event-stream"}), ("DELETE", {})):
            async with http.request(method, proxy.url, headers={**auth, **extra}) as response:
                answers.append(
                    (response.status, response.headers.get("Content-Type", ""), await response.read())
                )
    return answers


@pytest.mark.parametrize(
    ("tenant", "subject"),
    [("acme", "mallory"), ("globex", "alice"), ("acme", "alice@other-issuer")],  # the last: alice elsewhere
)
async def test_get_and_delete_with_someone_elses_session_id_answer_exactly_as_for_an_unknown_id(
    owner_proxy: RunningProxy, own_upstreams: dict[str, Upstream], tenant: str, subject: str
) -> None:
    proxy = owner_proxy
    alice = proxy.token("acme", "alice")
    session_id = await initialize(proxy, alice)
    if subject.endswith("@other-issuer"):
        thief = proxy.other_issuer_token(tenant, subject.removesuffix("@other-issuer"))
    else:
        thief = proxy.token(tenant, subject)
    never_issued = secrets.token_urlsafe(24)  # the same shape as the proxy's own ids
    assert len(never_issued) == len(session_id)
    before = {t: len(u.recorder.snapshot()) for t, u in own_upstreams.items()}
    unknown = await get_and_delete(proxy, thief, never_issued)
    stolen = await get_and_delete(proxy, thief, session_id)
    assert stolen == unknown
    for status, content_type, body in stolen:
        assert status == 404
        assert content_type.startswith("application/json")
        assert json.loads(body) == {
            "jsonrpc": "2.0",
            "id": None,
            "error": {"code": -32004, "message": "Session not found"},
        }
    # Neither attempt reached any upstream (no GET stream, no DELETE) ...
    assert {t: len(u.recorder.snapshot()) for t, u in own_upstreams.items()} == before
    # ... and the session is still its owner's: its stream opens, its requests are served.
    status, _, _ = await proxy.post(LIST_TOOLS, token=alice, headers=session_headers(session_id))
    assert status == 200
    headers = {
        "Authorization": f"Bearer {alice}",
        "Accept": "text/event-stream",
        **session_headers(session_id),
    }
    async with aiohttp.ClientSession() as http, http.get(proxy.url, headers=headers) as response:
        assert response.status == 200
    assert len(proxy.app[SERVICES].sessions) == 1


@pytest.mark.parametrize("with_params", [True, False])
async def test_an_initialize_inside_a_session_is_refused_and_never_forwarded(
    owner_proxy: RunningProxy, own_upstreams: dict[str, Upstream], with_params: bool
) -> None:
    proxy = owner_proxy
    alice = proxy.token("acme", "alice")
    session_id = await initialize(proxy, alice)
    before = len(own_upstreams["acme"].recorder.snapshot())
    body: dict[str, Any] = {"jsonrpc": "2.0", "id": 55, "method": "initialize"}
    if with_params:
        body["params"] = {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "again", "version": "1"},
        }
    status, _, raw = await proxy.post(body, token=alice, headers=session_headers(session_id))
    assert status == 400
    answer = json.loads(raw)
    assert answer["id"] == 55
    assert answer["error"]["code"] == -32600
    assert "without Mcp-Session-Id" in answer["error"]["message"]
    assert len(own_upstreams["acme"].recorder.snapshot()) == before  # nothing reached the upstream
    status, _, _ = await proxy.post(LIST_TOOLS, token=alice, headers=session_headers(session_id))
    assert status == 200  # and the session still works
    # Someone else's session id is still 404 first, exactly as for an unknown one.
    bob = proxy.token("acme", "bob")
    status, _, raw = await proxy.post(body, token=bob, headers=session_headers(session_id))
    assert status == 404
