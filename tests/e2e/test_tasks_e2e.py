"""Tasks of the 2026-07-28 extension through the proxy, against the real FastMCP 4.1.4 with
fastmcp-tasks 4.1.4, which two tenants share. FastMCP keeps every unauthenticated caller's tasks in
one space (any id it issued answers whoever presents it), so a task's id is all that stands between
one tenant and another's result: the proxy hands out ids of its own, bound to their caller.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from mcp_types import TextContent

from proxy.http.keys import SERVICES
from tests.conftest import MCP_ACCEPT, RunningProxy, StartProxy
from tests.e2e.test_scaleout_e2e import redis_server, start_replicas  # noqa: F401 - fixtures
from tests.e2e.test_transport_e2e import META, MODERN
from tests.task_upstreams import start_fastmcp_tasks
from tests.upstreams import Upstream, UpstreamThread

pytestmark = pytest.mark.e2e

TASKS = "io.modelcontextprotocol/tasks"
WITH_TASKS = {**META, "io.modelcontextprotocol/clientCapabilities": {"extensions": {TASKS: {}}}}


@pytest.fixture(scope="module")
def tasks_server() -> Iterator[Upstream]:
    runner = UpstreamThread()
    try:
        yield start_fastmcp_tasks(runner, f"CANARY-task-{secrets.token_hex(6)}")
    finally:
        runner.stop()


@pytest.fixture
async def shared(make_proxy: StartProxy, tasks_server: Upstream) -> RunningProxy:
    """acme and globex on the one FastMCP server."""
    tasks_server.recorder.clear()
    return await make_proxy(dict.fromkeys(("acme", "globex"), tasks_server))


async def send(
    running: RunningProxy,
    method: str,
    params: dict[str, Any],
    tenant: str = "acme",
    sub: str = "alice",
    name: str | None = None,
    token: str | None = None,
) -> tuple[int, dict[str, Any]]:
    body = {"jsonrpc": "2.0", "id": 7, "method": method, "params": {**params, "_meta": WITH_TASKS}}
    headers = {"MCP-Protocol-Version": MODERN, "Mcp-Method": method}
    if name is not None:
        headers["Mcp-Name"] = name
    token = token or running.token(tenant, sub)
    status, _, raw = await running.post(body, token=token, headers=headers)
    return status, json.loads(raw)


async def start_task(running: RunningProxy, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    status, answer = await send(running, "tools/call", {"name": tool, "arguments": arguments}, name=tool)
    assert status == 200, answer
    result: dict[str, Any] = answer["result"]
    assert result["resultType"] == "task" and result["status"] == "working"
    return result


async def poll(running: RunningProxy, task_id: str, until: set[str]) -> dict[str, Any]:
    """tasks/get until the task reaches one of `until` (polling is how a client follows a task)."""
    for _ in range(400):
        status, answer = await send(running, "tasks/get", {"taskId": task_id}, name=task_id)
        assert status == 200, answer
        if answer["result"]["status"] in until:
            return dict(answer["result"])
        await asyncio.sleep(0.02)
    raise AssertionError(f"the task never reached {until}")


def upstream_id_in(task_id: str) -> str:
    encoded = task_id.split(".")[1]
    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()


def task_requests(upstream: Upstream) -> list[dict[str, Any]]:
    return [
        json.loads(r.text)
        for r in upstream.recorder.snapshot()
        if r.method == "POST" and json.loads(r.text).get("method", "").startswith("tasks/")
    ]


async def test_a_task_answers_its_caller_and_is_unknown_to_everyone_else(
    shared: RunningProxy, tasks_server: Upstream
) -> None:
    task_id = (await start_task(shared, "slow_canary", {"seconds": 0.1}))["taskId"]
    done = await poll(shared, task_id, {"completed"})
    assert done["taskId"] == task_id
    assert tasks_server.canary in done["result"]["content"][0]["text"]
    tasks_server.recorder.clear()

    async def refused_everywhere(tenant: str, sub: str, presented: str, token: str | None = None) -> None:
        """Exactly the answer of an unknown task, whatever the method, and no upstream call."""
        for method in ("tasks/get", "tasks/cancel", "tasks/update"):
            params: dict[str, Any] = {"taskId": presented}
            if method == "tasks/update":
                params["inputResponses"] = {}
            status, answer = await send(shared, method, params, tenant, sub, presented, token)
            assert tasks_server.canary not in json.dumps(answer)
            assert (status, answer.get("error")) == (
                400,
                {"code": -32602, "message": "Failed to retrieve task: Task not found"},
            ), (tenant, sub, method, answer)
        assert task_requests(tasks_server) == []

    await refused_everywhere("globex", "alice", task_id)  # another tenant on the same upstream
    await refused_everywhere("acme", "mallory", task_id)  # another user of the same tenant
    # The same tenant and subject from another issuer of the tenant: another principal.
    await refused_everywhere("acme", "alice", task_id, shared.other_issuer_token("acme", "alice"))
    altered = task_id[:-2] + ("BB" if task_id.endswith("AA") else "AA")
    await refused_everywhere("acme", "alice", altered)
    await refused_everywhere("acme", "alice", "t1.bm9wZQ.AAAAAAAAAAAAAAAAAAAAAAAA")  # forged
    # The client never sees the upstream's id, and presenting it is no way around the binding.
    upstream_id = upstream_id_in(task_id)
    assert upstream_id not in json.dumps(done).replace(task_id, "")
    await refused_everywhere("acme", "alice", upstream_id)
    status, again = await send(shared, "tasks/get", {"taskId": task_id}, name=task_id)
    assert status == 200 and again["result"]["status"] == "completed"
    seen = [r for r in tasks_server.recorder.snapshot() if r.method == "POST"]
    assert [json.loads(r.text)["params"]["taskId"] for r in seen] == [upstream_id]  # the upstream's own id
    assert seen[0].headers["mcp-name"] == upstream_id


async def test_a_task_id_header_that_disagrees_with_the_body_is_refused_and_a_missing_one_is_not(
    shared: RunningProxy,
) -> None:
    task_id = (await start_task(shared, "slow_canary", {"seconds": 0.0}))["taskId"]
    status, answer = await send(shared, "tasks/get", {"taskId": task_id}, name="t1.other.id")
    assert (status, answer["error"]["code"]) == (400, -32020)
    status, answer = await send(shared, "tasks/get", {"taskId": task_id})  # as fastmcp-tasks sends it
    assert status == 200 and answer["result"]["taskId"] == task_id


async def test_input_a_task_waits_for_goes_through_under_the_callers_ids(
    shared: RunningProxy, tasks_server: Upstream
) -> None:
    task_id = (await start_task(shared, "ask_name", {}))["taskId"]
    waiting = await poll(shared, task_id, {"input_required"})
    [key] = waiting["inputRequests"]
    assert key.startswith(f"{task_id}:")  # FastMCP puts its task id in the key: the client sees ours
    assert waiting["inputRequests"][key]["method"] == "elicitation/create"
    answer = {"action": "accept", "content": {"name": "Luca"}}
    status, acked = await send(
        shared, "tasks/update", {"taskId": task_id, "inputResponses": {key: answer}}, name=task_id
    )
    assert status == 200 and acked["result"]["resultType"] == "complete", acked
    done = await poll(shared, task_id, {"completed"})
    assert done["result"]["content"][0]["text"] == f"{tasks_server.canary} hello Luca"


async def test_a_cancelled_task_stays_cancelled(shared: RunningProxy) -> None:
    task_id = (await start_task(shared, "slow_canary", {"seconds": 30}))["taskId"]
    status, acked = await send(shared, "tasks/cancel", {"taskId": task_id}, name=task_id)
    assert status == 200, acked
    assert (await poll(shared, task_id, {"cancelled", "completed", "failed"}))["status"] == "cancelled"


async def test_task_handles_are_never_cached_and_creation_and_completion_are_audited(
    make_proxy: StartProxy, tasks_server: Upstream
) -> None:
    running = await make_proxy(
        {"acme": tasks_server}, policies={"acme": {"tools": {"cache_ttl_seconds": {"slow_canary": 60}}}}
    )
    first = await start_task(running, "slow_canary", {"seconds": 0.0})
    second = await start_task(running, "slow_canary", {"seconds": 0.0})
    assert first["taskId"] != second["taskId"]  # two calls, two tasks: never the cached handle
    await poll(running, first["taskId"], {"completed"})
    await poll(running, first["taskId"], {"completed"})
    services = running.app[SERVICES]
    services.flush()
    records = [r for r in await services.audit.recent("acme", 50) if r["task_event"] is not None]
    events = sorted(r["task_event"] for r in records)
    assert events == ["completed", "created", "created"]  # a finish is recorded once, however polled
    assert all(r["task"] and first["taskId"] not in json.dumps(r) for r in records)


async def test_only_the_extensions_the_proxy_enforces_are_offered_unless_the_policy_allows_more(
    make_proxy: StartProxy, tasks_server: Upstream
) -> None:
    running = await make_proxy(
        dict.fromkeys(("acme", "globex"), tasks_server),
        policies={"globex": {"extensions": {"allow": ["io.modelcontextprotocol/ui"]}}},
    )
    offered = {}
    for tenant in ("acme", "globex"):
        status, answer = await send(running, "server/discover", {}, tenant)
        assert status == 200, answer
        offered[tenant] = set(answer["result"]["capabilities"]["extensions"])
    assert offered == {"acme": {TASKS}, "globex": {TASKS, "io.modelcontextprotocol/ui"}}


async def test_the_fastmcp_client_runs_tasks_through_the_proxy(
    shared: RunningProxy, tasks_server: Upstream
) -> None:
    from fastmcp import Client
    from fastmcp_tasks import call_tool_task

    async with Client(shared.url, auth=shared.token("acme")) as client:
        result = await client.call_tool("slow_canary", {"seconds": 0.1})  # a task, polled by the client
        assert tasks_server.canary in result.content[0].text
        task = await call_tool_task(client, "slow_canary", {"seconds": 0.1})
        assert task.task_id.startswith("t1.")
        block = (await task.result()).content[0]
        assert isinstance(block, TextContent) and tasks_server.canary in block.text


async def test_a_task_started_on_one_replica_is_followed_on_the_other_by_its_caller_only(
    start_replicas: Any,  # noqa: F811 - the fixture imported above
    tasks_server: Upstream,
) -> None:
    replicas = await start_replicas(dict.fromkeys(("acme", "globex"), tasks_server.url))

    async def send_to(url: str, method: str, params: dict[str, Any], tenant: str) -> dict[str, Any]:
        body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {**params, "_meta": WITH_TASKS}}
        headers = {
            "Accept": MCP_ACCEPT,
            "Authorization": f"Bearer {replicas.token(tenant)}",
            "MCP-Protocol-Version": MODERN,
            "Mcp-Method": method,
            "Mcp-Name": params.get("name") or params["taskId"],
        }
        async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as response:
            answer: dict[str, Any] = await response.json()
            return answer

    started = await send_to(replicas.a.url, "tools/call", {"name": "slow_canary", "arguments": {}}, "acme")
    task_id = started["result"]["taskId"]
    for _ in range(400):
        got = await send_to(replicas.b.url, "tasks/get", {"taskId": task_id}, "acme")
        if got["result"]["status"] == "completed":
            break
        await asyncio.sleep(0.02)
    assert tasks_server.canary in got["result"]["result"]["content"][0]["text"]
    refused = await send_to(replicas.b.url, "tasks/get", {"taskId": task_id}, "globex")
    assert refused["error"]["code"] == -32602
    owner = ("acme", '["dev","alice"]', f"http:{tasks_server.url}")  # the principal: issuer and subject
    assert await replicas.b.services.tasks.owned(owner) == {upstream_id_in(task_id)}  # whose it is, shared
    elsewhere = ("acme", '["https://rsa.idp.test","alice"]', owner[2])  # alice from another issuer
    assert await replicas.b.services.tasks.owned(elsewhere) == frozenset()
