"""Resumable POST streams (2025-11-25, SEP-1699) through the proxy, against the Python SDK's server
with an event store and a retry interval, whose tool closes its own request's stream mid-call: the
priming event and retry reach the client under the proxy's ids, the client resumes with GET and
Last-Event-ID, and the rest of the stream (progress, then the answer) arrives through the proxy.
Only the session that the stream belongs to can resume it; two tenants share the upstream (and its
event store, which replays any stream to whoever names one of its events).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from proxy.demo import client_for
from tests.conftest import MCP_ACCEPT, RunningProxy, StartProxy
from tests.e2e.test_transport_e2e import initialize, session_headers, text_of
from tests.upstreams import Upstream, UpstreamThread, start_resumable_upstream

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def resumable() -> Iterator[Upstream]:
    runner = UpstreamThread()
    try:
        yield start_resumable_upstream(runner, "shared", f"CANARY-resumable-{secrets.token_hex(6)}")
    finally:
        runner.stop()


@pytest.fixture
async def running(make_proxy: StartProxy, resumable: Upstream) -> RunningProxy:
    resumable.recorder.clear()
    return await make_proxy(dict.fromkeys(("acme", "globex"), resumable))


def events_of(raw: bytes) -> list[dict[str, Any]]:
    """The SSE events of a body: their fields, data parsed when there is any."""
    events = []
    for block in raw.decode().replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.splitlines():
            name, _, value = line.partition(": ")
            fields[name] = json.loads(value) if name == "data" and value else value
        if fields:
            events.append(fields)
    return events


async def test_the_sdk_client_resumes_a_stream_the_upstream_closed_and_gets_its_answer(
    running: RunningProxy, resumable: Upstream
) -> None:
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    async with client_for(running.url, running.token("acme"), "legacy") as client:
        result = await client.call_tool("close_then_finish", {"seconds": 0.2}, progress_callback=on_progress)
    assert text_of(result) == f"finished after the stream was closed {resumable.canary}"
    assert progress == [1, 2]
    resumed = [r for r in resumable.recorder.snapshot() if r.method == "GET" and "last-event-id" in r.headers]
    assert resumed and all(
        r.headers["last-event-id"].startswith("up-") for r in resumed
    )  # the upstream's ids


async def test_only_the_session_a_stream_belongs_to_can_resume_it(
    running: RunningProxy, resumable: Upstream
) -> None:
    acme, globex, acme_again = running.token("acme"), running.token("globex"), running.token("acme")
    mine = await initialize(running, acme)
    call = {
        "jsonrpc": "2.0",
        "id": 5,
        "method": "tools/call",
        "params": {"name": "close_then_finish", "arguments": {"seconds": 0.3}, "_meta": {"progressToken": 5}},
    }
    status, _, raw = await running.post(call, token=acme, headers=session_headers(mine))
    assert status == 200
    posted = events_of(raw)
    assert posted and not any(event.get("data") for event in posted)  # closed upstream, unanswered
    priming = posted[0]
    assert priming["id"] and priming["retry"] == "100" and not priming["id"].startswith("up-")

    async def get(
        token: str, session: str, last_event_id: str, into: bytearray, until: bytes = b"", opened: Any = None
    ) -> int:
        headers = {
            "Accept": MCP_ACCEPT,
            "Authorization": f"Bearer {token}",
            "Last-Event-ID": last_event_id,
            **session_headers(session),
        }
        async with aiohttp.ClientSession() as http, http.get(running.url, headers=headers) as response:
            if opened is not None:
                opened.set()
            async for chunk in response.content.iter_any():
                into += chunk
                if until and until in into:
                    break
            return response.status

    # Other sessions name the event: another tenant's, and another of the same caller's. Each gets
    # its own session's stream, open before the owner resumes; neither replays the owner's stream.
    theirs = await initialize(running, globex)
    other_of_mine = await initialize(running, acme_again)
    seen_by = {theirs: bytearray(), other_of_mine: bytearray()}
    strangers = []
    for token, session in ((globex, theirs), (acme_again, other_of_mine)):
        opened = asyncio.Event()
        strangers.append(
            asyncio.create_task(get(token, session, priming["id"], seen_by[session], opened=opened))
        )
        await opened.wait()
    resumed = bytearray()
    assert await get(acme, mine, priming["id"], resumed, until=resumable.canary.encode()) == 200
    messages = [event["data"] for event in events_of(bytes(resumed)) if event.get("data")]
    assert [m["params"]["progress"] for m in messages if m.get("method") == "notifications/progress"] == [
        1,
        2,
    ]
    assert messages[-1]["id"] == 5
    assert messages[-1]["result"]["content"][0]["text"].endswith(resumable.canary)
    for stranger in strangers:
        stranger.cancel()
    await asyncio.gather(*strangers, return_exceptions=True)
    for seen in seen_by.values():
        assert resumable.canary.encode() not in seen and b"progress" not in seen
    # Nothing comes after the answer: a resumption from there (the TypeScript SDK sends one after an
    # error answer) is told so at once.
    answer_id = [event["id"] for event in events_of(bytes(resumed)) if event.get("data")][-1]
    assert await get(acme, mine, answer_id, bytearray()) == 405
