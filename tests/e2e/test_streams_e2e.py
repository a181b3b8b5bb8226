"""SSE relay and server-to-client requests through the proxy, in both protocol eras.

Streaming is checked by the clock (the first progress event reaches the client long before the
final answer), cancellation by what the upstream tool itself recorded, and the back channel by
the real SDK client's sampling and elicitation callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from mcp.server.streamable_http import EventMessage, EventStore
from mcp_types import CreateMessageResult, ElicitResult, TextContent

from tests.conftest import MCP_ACCEPT, RunningProxy
from tests.e2e.test_transport_e2e import (
    call_body,
    error_of,
    initialize,
    modern_headers,
    posted,
    proxy_variant,
    requests_with,
    session_headers,
    sse_messages,
    text_of,
)
from tests.upstreams import TOOL_EVENTS

pytestmark = pytest.mark.e2e


def sdk_client(proxy: RunningProxy, mode: str, **callbacks: Any) -> Any:
    """The real SDK client through the proxy, with the given sampling/elicitation callbacks."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {proxy.token('acme')}"}, timeout=30)
    return Client(streamable_http_client(proxy.url, http_client=http), mode=mode, **callbacks)


def _auth(proxy: RunningProxy, **extra: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {proxy.token('acme')}",
        "Accept": MCP_ACCEPT,
        "Content-Type": "application/json",
        **extra,
    }


def _with_progress(body: dict[str, Any], token: str = "progress-1") -> dict[str, Any]:
    body["params"]["_meta"] = {**body["params"].get("_meta", {}), "progressToken": token}
    return body


async def _timed_stream(
    proxy: RunningProxy, body: dict[str, Any], headers: dict[str, str]
) -> list[tuple[float, dict[str, Any]]]:
    """POST and collect (seconds since sending, message) for every SSE message of the answer."""
    started = time.monotonic()
    seen: list[tuple[float, dict[str, Any]]] = []
    async with (
        aiohttp.ClientSession() as http,
        http.post(proxy.url, data=json.dumps(body), headers=_auth(proxy, **headers)) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        async for message in sse_messages(response):
            seen.append((time.monotonic() - started, message))
    return seen


def _assert_streamed(seen: list[tuple[float, dict[str, Any]]], n: int, delay: float) -> None:
    progress = [(t, m) for t, m in seen if m.get("method") == "notifications/progress"]
    assert [m["params"]["progress"] for _, m in progress] == list(range(1, n + 1))
    assert all(m["params"]["progressToken"] == "progress-1" for _, m in progress)
    final_at, final = seen[-1]
    assert final["id"] == 1
    assert final["result"]["structuredContent"]["done"] == n
    first_at = progress[0][0]
    # Relayed as they happen: the first event arrives about (n - 1) * delay before the answer.
    assert first_at < 0.5
    assert final_at >= (n - 1) * delay
    assert final_at - first_at >= (n - 1) * delay * 0.8


async def test_modern_progress_is_streamed_not_buffered(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    body = _with_progress(call_body("countdown", {"n": 4, "delay": 0.25}))
    seen = await _timed_stream(proxy, body, modern_headers("tools/call", "countdown"))
    _assert_streamed(seen, 4, 0.25)
    assert upstreams["acme"].canary in json.dumps(seen[-1][1])


async def test_handshake_progress_is_streamed_not_buffered(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    session_id = await initialize(proxy, proxy.token("acme"))
    body = _with_progress(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "countdown", "arguments": {"n": 4, "delay": 0.25}},
        }
    )
    seen = await _timed_stream(proxy, body, session_headers(session_id))
    _assert_streamed(seen, 4, 0.25)
    (call,) = requests_with(upstreams["acme"], "tools/call")
    assert call.headers["mcp-session-id"] != session_id


async def _wait_for(predicate: Any, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return bool(predicate())


async def test_a_client_disconnect_cancels_the_upstream_call(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    tag = secrets.token_hex(6)
    body = _with_progress(call_body("watched_countdown", {"tag": tag, "n": 20, "delay": 0.2}))
    http = aiohttp.ClientSession()
    try:
        response = await http.post(
            proxy.url,
            data=json.dumps(body),
            headers=_auth(proxy, **modern_headers("tools/call", "watched_countdown")),
        )
        assert response.status == 200
        first = await anext(sse_messages(response))
        assert first["method"] == "notifications/progress"
        response.close()  # the client goes away mid-stream
    finally:
        await http.close()
    events = TOOL_EVENTS.setdefault(tag, [])
    assert await _wait_for(lambda: "cancelled" in events), events
    steps = [e for e in events if e.startswith("step")]
    assert "finished" not in events
    assert len(steps) <= 5  # cancelled within about a second of the disconnect, not after 4 s


async def test_an_uninterrupted_watched_call_finishes(proxy: RunningProxy) -> None:
    """The control for the disconnect test: without a disconnect the same tool runs to the end."""
    tag = secrets.token_hex(6)
    body = _with_progress(call_body("watched_countdown", {"tag": tag, "n": 2, "delay": 0.05}))
    seen = await _timed_stream(proxy, body, modern_headers("tools/call", "watched_countdown"))
    assert seen[-1][1]["result"]["structuredContent"]["done"] == 2
    assert TOOL_EVENTS[tag] == ["started", "step 1", "step 2", "finished"]


# --- D. server-to-client requests ----------------------------------------------------------------


async def _sample(context: Any, params: Any) -> CreateMessageResult:
    prompt = params.messages[0].content.text
    return CreateMessageResult(
        role="assistant",
        content=TextContent(type="text", text=f"answer to: {prompt}"),
        model="test-model-7",
    )


async def _pick_teal(context: Any, params: Any) -> ElicitResult:
    assert "Pick a colour" in params.message
    return ElicitResult(action="accept", content={"colour": "teal"})


async def test_handshake_sampling_round_trip_through_the_proxy(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    async with sdk_client(proxy, "legacy", sampling_callback=_sample) as client:
        result = await client.call_tool("ask_model", {"topic": "whales"})
    assert not result.is_error, text_of(result)
    answer = json.loads(text_of(result))
    assert answer["model"] == "test-model-7"
    assert answer["text"] == "answer to: Say something about whales"
    messages = posted(upstreams["acme"])
    answers = [m for m in messages if "method" not in m]
    assert len(answers) == 1
    assert answers[0]["result"]["model"] == "test-model-7"
    records = [r for r in upstreams["acme"].recorder.snapshot() if r.method == "POST"]
    call_record = next(r for r in records if json.loads(r.text).get("method") == "tools/call")
    answer_record = next(r for r in records if "method" not in json.loads(r.text))
    assert answer_record.headers["mcp-session-id"] == call_record.headers["mcp-session-id"]


async def test_handshake_elicitation_round_trip_through_the_proxy(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    async with sdk_client(proxy, "legacy", elicitation_callback=_pick_teal) as client:
        result = await client.call_tool("ask_user", {"topic": "kitchen"})
    assert not result.is_error, text_of(result)
    assert json.loads(text_of(result))["colour"] == "teal"
    answers = [m for m in posted(upstreams["acme"]) if "method" not in m]
    assert [a["result"]["content"] for a in answers] == [{"colour": "teal"}]


async def test_modern_elicitation_round_trip_through_the_proxy(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    """2026-07-28: no back channel; the upstream answers input_required and the client retries."""
    async with sdk_client(proxy, "auto", elicitation_callback=_pick_teal) as client:
        result = await client.call_tool("ask_user", {"topic": "hallway"})
    assert not result.is_error, text_of(result)
    assert json.loads(text_of(result)) == {
        "topic": "hallway",
        "colour": "teal",
        "canary": upstreams["acme"].canary,
    }
    calls = [json.loads(r.text) for r in requests_with(upstreams["acme"], "tools/call")]
    assert len(calls) == 2
    assert "inputResponses" not in calls[0]["params"]
    assert calls[1]["params"]["requestState"]
    assert "teal" in json.dumps(calls[1]["params"]["inputResponses"])


async def test_modern_sampling_round_trip_through_the_proxy(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    async with sdk_client(proxy, "auto", sampling_callback=_sample) as client:
        result = await client.call_tool("ask_model", {"topic": "tides"})
    assert not result.is_error, text_of(result)
    assert json.loads(text_of(result))["text"] == "answer to: Say something about tides"
    assert len(requests_with(upstreams["acme"], "tools/call")) == 2


async def test_an_answer_to_a_server_request_the_session_never_saw_is_refused(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    session_id = await initialize(proxy, proxy.token("acme"))
    before = len(upstreams["acme"].recorder.snapshot())
    for stray in (
        {"jsonrpc": "2.0", "id": 0, "result": {"role": "assistant", "model": "m", "content": {}}},
        {"jsonrpc": "2.0", "id": "srv-1", "error": {"code": -1, "message": "no"}},
    ):
        status, _, body = await proxy.post(
            stray, token=proxy.token("acme"), headers=session_headers(session_id)
        )
        assert status == 400
        error = error_of(body)
        assert error["code"] == -32600
        assert "no pending server request" in error["message"]
    assert len(upstreams["acme"].recorder.snapshot()) == before


async def _open_sampling_call(
    http: aiohttp.ClientSession, proxy: RunningProxy, session_id: str
) -> tuple[aiohttp.ClientResponse, Any, dict[str, Any]]:
    """tools/call ask_model on a raw session: returns the open stream and the server's request."""
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "ask_model", "arguments": {"topic": "owls"}},
    }
    response = await http.post(
        proxy.url, data=json.dumps(body), headers=_auth(proxy, **session_headers(session_id))
    )
    assert response.status == 200
    events = sse_messages(response)
    server_request = await anext(events)
    assert server_request["method"] == "sampling/createMessage"
    return response, events, server_request


def _sampling_answer(request_id: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "result": {"role": "assistant", "model": "raw-model", "content": {"type": "text", "text": "hoot"}},
    }


async def test_a_server_request_is_answered_once_and_only_on_its_own_session(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    token = proxy.token("acme")
    owner = await initialize(proxy, token, {"sampling": {}})
    bystander = await initialize(proxy, token, {"sampling": {}})
    async with aiohttp.ClientSession() as http:
        response, events, server_request = await _open_sampling_call(http, proxy, owner)
        try:
            answer = _sampling_answer(server_request["id"])
            # Another session of the same user cannot answer it ...
            status, _, body = await proxy.post(answer, token=token, headers=session_headers(bystander))
            assert (status, error_of(body)["code"]) == (400, -32600)
            assert not [m for m in posted(upstreams["acme"]) if "method" not in m]
            # ... its own session can, once.
            status, _, body = await proxy.post(answer, token=token, headers=session_headers(owner))
            assert (status, body) == (202, b"")
            final = await anext(events)
        finally:
            response.close()
        assert final["id"] == 1
        assert json.loads(final["result"]["content"][0]["text"])["text"] == "hoot"
        status, _, body = await proxy.post(answer, token=token, headers=session_headers(owner))
        assert (status, error_of(body)["code"]) == (400, -32600)
    forwarded = [m for m in posted(upstreams["acme"]) if "method" not in m]
    assert forwarded == [answer]


# --- E. resumption: Last-Event-ID is scoped to the session that was issued it -------------------


class MemoryEventStore(EventStore):
    """A resumable upstream's event store; its ids ("up-N") differ from the proxy's own."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []

    async def store_event(self, stream_id: str, message: Any) -> str:
        event_id = f"up-{len(self.events) + 1}"
        self.events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(self, last_event_id: str, send_callback: Any) -> str | None:
        ids = [event[0] for event in self.events]
        if last_event_id not in ids:
            return None
        position = ids.index(last_event_id)
        stream = self.events[position][1]
        for event_id, stream_id, message in self.events[position + 1 :]:
            if stream_id == stream and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream


@contextlib.asynccontextmanager
async def resumable_upstream() -> AsyncIterator[Any]:
    """An SDK notes server with an event store, under uvicorn on this test's loop."""
    import uvicorn

    from proxy.demo_upstream import build_notes_server
    from tests.upstreams import Recorder, Upstream, add_test_tools, free_port

    server = build_notes_server("acme", "CANARY-resumable")
    add_test_tools(server, "CANARY-resumable")
    recorder = Recorder(server.streamable_http_app(host="127.0.0.1", event_store=MemoryEventStore()))
    port = free_port()
    uvicorn_server = uvicorn.Server(
        uvicorn.Config(recorder, host="127.0.0.1", port=port, log_level="warning", lifespan="on", ws="none")
    )
    task = asyncio.create_task(uvicorn_server.serve())
    while not uvicorn_server.started:
        assert not task.done()
        await asyncio.sleep(0.01)
    try:
        yield Upstream("acme", "CANARY-resumable", port, recorder)
    finally:
        uvicorn_server.should_exit = True
        await task


async def _stream_ids(http: aiohttp.ClientSession, proxy: RunningProxy, session_id: str) -> list[str]:
    """Run a short countdown on the session; the SSE event ids the client saw."""
    body = call_body("countdown", {"n": 3, "delay": 0})
    body["params"]["_meta"] = {"progressToken": "resume-test"}
    ids: list[str] = []
    async with http.post(
        proxy.url, data=json.dumps(body), headers=_auth(proxy, **session_headers(session_id))
    ) as response:
        assert response.status == 200
        async for raw in response.content:
            line = raw.decode().strip()
            if line.startswith("id:"):
                ids.append(line[3:].strip())
    return ids


async def test_a_last_event_id_from_another_session_replays_nothing(proxy: RunningProxy) -> None:
    async with (
        resumable_upstream() as upstream,
        proxy_variant(proxy, upstreams={"acme": {"url": upstream.url}}) as resumable,
    ):
        token = resumable.token("acme")
        owner = await initialize(resumable, token)
        other = await initialize(resumable, token)
        async with aiohttp.ClientSession() as http:
            owner_ids = await _stream_ids(http, resumable, owner)
            assert len(owner_ids) == 5  # a priming event, three progress events, the answer
            assert not any(i.startswith("up-") for i in owner_ids)  # the upstream's ids stay inside
            upstream.recorder.clear()
            get = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
            # Another session presents the owner's latest id: a fresh stream, nothing resumed.
            headers = {**get, **session_headers(other), "Last-Event-ID": owner_ids[-1]}
            async with http.get(resumable.url, headers=headers) as response:
                assert response.status == 200
            (foreign_get,) = [r for r in upstream.recorder.snapshot() if r.method == "GET"]
            assert "last-event-id" not in foreign_get.headers
            # The owner presenting its own id resumes: the upstream's id goes up, events come back.
            upstream.recorder.clear()
            headers = {**get, **session_headers(owner), "Last-Event-ID": owner_ids[1]}
            async with http.get(resumable.url, headers=headers) as response:
                assert response.status == 200
                replayed = await asyncio.wait_for(anext(sse_messages(response)), 5)
            (own_get,) = [r for r in upstream.recorder.snapshot() if r.method == "GET"]
            assert own_get.headers["last-event-id"].startswith("up-")
            assert replayed["method"] == "notifications/progress"
            assert replayed["params"]["progress"] == 2  # what followed event owner_ids[1]
