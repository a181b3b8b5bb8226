"""The replay probes against scripted deployments: one that binds task ids and request state to
their tenant, and one that serves whoever holds them (as FastMCP does for anonymous callers)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.config import ProxyConfig
from proxy.types import Era
from proxy.upstreams.base import MockResponse, MockUpstream, UpstreamRequest
from proxy.verify.client import McpClient
from proxy.verify.inventory import Inventory, TenantView
from proxy.verify.probe import Party
from proxy.verify.replay import TASKS_EXTENSION, create_tasks, replay_request_state, replay_tasks
from proxy.verify.report import Report
from tests.factories import config_dict

TOOL = {"name": "slow_report", "inputSchema": {"type": "object", "properties": {"topic": {"type": "string"}}}}


class Deployment:
    """Scripted answers for every tenant; `binds` decides whether ids answer only their owner."""

    def __init__(self, binds: bool) -> None:
        self.binds = binds
        self.owners: dict[str, str] = {}  # task id or request state -> tenant

    def transport(self, tenant: str) -> MockUpstream:
        return MockUpstream(lambda request: self.answer(tenant, request), tenant=tenant)

    def answer(self, tenant: str, request: UpstreamRequest) -> MockResponse:
        message = json.loads(request.body or b"{}")
        params, method = message.get("params") or {}, message.get("method")
        result: dict[str, Any] | None
        if method == "server/discover":
            result = {
                "supportedVersions": ["2026-07-28"],
                "capabilities": {"extensions": {TASKS_EXTENSION: {}}},
            }
        elif method == "tools/call" and "requestState" in params:
            owner = self.owners.get(params["requestState"])
            result = {"content": [], "isError": False} if owner == tenant or not self.binds else None
        elif method == "tools/call" and params["arguments"].get("topic") == "ask":
            self.owners[f"state-{tenant}"] = tenant
            result = {"resultType": "input_required", "requestState": f"state-{tenant}",
                      "inputRequests": {"k": {"method": "elicitation/create", "params": {}}}}  # fmt: skip
        elif method == "tools/call":
            self.owners[f"task-{tenant}"] = tenant
            result = {"resultType": "task", "taskId": f"task-{tenant}", "status": "working", "ttlMs": None}
        elif method == "tasks/get":
            owner = self.owners.get(params["taskId"])
            result = (
                {"taskId": params["taskId"], "status": "working"}
                if owner == tenant or not self.binds
                else None
            )
        else:
            result = {}
        if result is None:
            error = {"code": -32602, "message": "not found"}
            return MockResponse(400, {"jsonrpc": "2.0", "id": message["id"], "error": error})
        return MockResponse(body={"jsonrpc": "2.0", "id": message["id"], "result": result})


def last_sent(party: Party) -> Any:
    """The last message a party's client sent through its deployment's MockUpstream."""
    transport = party.client.transport
    assert isinstance(transport, MockUpstream)
    return json.loads(transport.requests[-1].body or b"{}")


async def party(deployment: Deployment, tenant: str) -> Party:
    config = ProxyConfig.model_validate(
        config_dict({"acme": "http://x.invalid/mcp", "globex": "http://x.invalid/mcp"})
    )
    view = TenantView.of(config, tenant)
    view.inventory = Inventory(Era.MODERN, tools=[TOOL])
    client = McpClient(deployment.transport(tenant), f"tenant {tenant}")
    await client.connect()
    return Party(view, client)


@pytest.mark.parametrize("binds", [True, False])
async def test_task_ids_replayed_by_another_tenant_are_found_unless_bound(binds: bool) -> None:
    deployment = Deployment(binds)
    acme, globex = await party(deployment, "acme"), await party(deployment, "globex")
    report = Report("scripted", ("acme", "globex"), True)
    await create_tasks(acme, report)
    assert acme.task_ids == ["task-acme"]
    sent = last_sent(acme)
    assert (
        TASKS_EXTENSION in sent["params"]["_meta"]["io.modelcontextprotocol/clientCapabilities"]["extensions"]
    )
    await replay_tasks(acme, globex, report)
    found = [f.id for f in report.open_findings]
    assert found == ([] if binds else ["probe-task-replay:globex:tasks/get"])


@pytest.mark.parametrize("binds", [True, False])
async def test_request_state_replayed_by_another_tenant_is_found_unless_bound(binds: bool) -> None:
    deployment = Deployment(binds)
    acme, globex = await party(deployment, "acme"), await party(deployment, "globex")
    report = Report("scripted", ("acme", "globex"), True)
    await acme.call("slow_report", {"topic": "ask"}, report)
    assert [state.request_state for state in acme.input_states] == ["state-acme"]
    await replay_request_state(acme, globex, report)
    retried = last_sent(globex)
    assert retried["params"]["requestState"] == "state-acme"
    assert retried["params"]["inputResponses"] == {"k": {"action": "decline"}}
    found = [f.id for f in report.open_findings]
    assert found == ([] if binds else ["probe-request-state-replay:globex:slow_report"])
