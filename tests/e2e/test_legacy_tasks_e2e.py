"""2025-11-25 experimental tasks through the proxy, against a raw server of that form which two
tenants share and which, like the servers that implement it, lists every task to every caller and
tells every session of every task's status: each caller sees its own tasks only, under the proxy's ids.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import MCP_ACCEPT, RunningProxy, StartProxy
from tests.e2e.test_transport_e2e import initialize, session_headers, sse_messages
from tests.task_upstreams import LegacyTasks, start_legacy_tasks
from tests.upstreams import Upstream, UpstreamThread

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def legacy_server() -> Iterator[tuple[Upstream, LegacyTasks]]:
    runner = UpstreamThread()
    try:
        yield start_legacy_tasks(runner, f"CANARY-legacy-{secrets.token_hex(6)}")
    finally:
        runner.stop()


class Caller:
    def __init__(self, running: RunningProxy, tenant: str, token: str | None = None) -> None:
        self.running, self.token = running, token or running.token(tenant)
        self.session = ""
        self.ids = 0

    async def open(self) -> Caller:
        self.session = await initialize(self.running, self.token)
        return self

    async def ask(self, method: str, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.ids += 1
        body = {"jsonrpc": "2.0", "id": self.ids, "method": method, "params": params}
        headers = session_headers(self.session)
        status, _, raw = await self.running.post(body, token=self.token, headers=headers)
        return status, json.loads(raw)

    async def start(self, tag: str, seconds: float) -> str:
        arguments = {"tag": tag, "seconds": seconds}
        status, answer = await self.ask(
            "tools/call", {"name": "research", "arguments": arguments, "task": {}}
        )
        assert status == 200, answer
        task_id: str = answer["result"]["task"]["taskId"]
        assert task_id.startswith("t1.")
        return task_id


async def test_each_caller_sees_its_own_tasks_only_under_the_proxys_ids(
    make_proxy: StartProxy, legacy_server: tuple[Upstream, LegacyTasks]
) -> None:
    upstream, state = legacy_server
    running = await make_proxy(dict.fromkeys(("acme", "globex"), upstream))
    acme, globex = await Caller(running, "acme").open(), await Caller(running, "globex").open()
    notified: list[dict[str, Any]] = []
    headers = {"Accept": MCP_ACCEPT, "Authorization": f"Bearer {acme.token}", **session_headers(acme.session)}
    async with aiohttp.ClientSession() as http, http.get(running.url, headers=headers) as stream:
        assert stream.status == 200

        async def listen() -> None:
            async for message in sse_messages(stream):
                notified.append(message)

        listening = asyncio.create_task(listen())
        theirs = await globex.start("globex-work", 0.0)
        mine = await acme.start("acme-work", 0.2)
        status, listed = await acme.ask("tasks/list", {})
        assert status == 200 and [t["taskId"] for t in listed["result"]["tasks"]] == [mine]
        assert len(state.tasks) == 2  # the upstream listed both
        upstream.recorder.clear()
        status, refused = await globex.ask("tasks/get", {"taskId": mine})
        assert (status, refused["error"]["code"]) == (200, -32602)  # an answer (handshake era), no leak
        status, refused = await globex.ask("tasks/result", {"taskId": mine})
        assert (status, refused["error"]["code"]) == (200, -32602)
        assert upstream.recorder.snapshot() == []
        # acme's alice again, from the tenant's other issuer: another principal, none of her tasks.
        elsewhere = await Caller(running, "acme", running.other_issuer_token("acme", "alice")).open()
        for method in ("tasks/get", "tasks/result", "tasks/cancel"):
            status, refused = await elsewhere.ask(method, {"taskId": mine})
            assert (status, refused["error"]["code"]) == (200, -32602), (method, refused)
        status, listed = await elsewhere.ask("tasks/list", {})
        assert status == 200 and listed["result"]["tasks"] == []
        status, result = await acme.ask("tasks/result", {"taskId": mine})  # waits for the task to finish
        assert status == 200, result
        assert result["result"]["content"][0]["text"] == f"{upstream.canary} acme-work"
        assert result["result"]["_meta"]["io.modelcontextprotocol/related-task"] == {"taskId": mine}
        status, got = await acme.ask("tasks/get", {"taskId": mine})
        assert (status, got["result"]["taskId"], got["result"]["status"]) == (200, mine, "completed")
        long = await acme.start("never", 30)
        status, cancelled = await acme.ask("tasks/cancel", {"taskId": long})
        assert (status, cancelled["result"]["status"]) == (200, "cancelled")
        for _ in range(200):  # the status notifications of acme's tasks reach acme's stream
            if {(n["params"]["taskId"], n["params"]["status"]) for n in notified} >= {
                (mine, "completed"),
                (long, "cancelled"),
            }:
                break
            await asyncio.sleep(0.02)
        listening.cancel()
    statuses = [n for n in notified if n.get("method") == "notifications/tasks/status"]
    assert {n["params"]["taskId"] for n in statuses} == {mine, long}  # globex's task: never heard of
    assert theirs not in json.dumps(notified) and "globex-work" not in json.dumps(notified)
    for task_id in state.tasks:
        assert task_id not in json.dumps(notified)  # no upstream id reaches the client
