"""Task ids bound to their caller (layers/sessions/task_store.py), and the task hooks on what no
installable server sends yet: notifications/tasks on a subscriptions/listen stream (SEP-2663)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.flow import Request, ServerKind, ServerMessage
from proxy.layers.containment.request_state import RequestStateSeal
from proxy.layers.sessions import tasks
from proxy.layers.sessions.task_store import TaskStore, bindable, issue, open_id
from tests.factories import make_config, make_request

ACME = ("acme", "alice", "http:http://upstream/mcp")


def test_a_task_id_opens_only_for_the_caller_and_upstream_it_was_issued_to() -> None:
    seal = RequestStateSeal()
    task_id = issue(seal, ACME, "VcmoLgmIHgbmiv7WsXGU7Y9IA8cxyBz4OOrpHdqLWNE")
    assert issue(seal, ACME, "VcmoLgmIHgbmiv7WsXGU7Y9IA8cxyBz4OOrpHdqLWNE") == task_id  # deterministic
    assert open_id(seal, ACME, task_id) == "VcmoLgmIHgbmiv7WsXGU7Y9IA8cxyBz4OOrpHdqLWNE"
    for other in (("globex", "alice", ACME[2]), ("acme", "mallory", ACME[2]), ("acme", "alice", "http:x")):
        assert open_id(seal, other, task_id) is None
    assert open_id(RequestStateSeal(), ACME, task_id) is None  # another key (another deployment)
    prefix, encoded, tag = task_id.split(".")
    for forged in (
        f"{prefix}.{encoded}=.{tag}",
        f"{prefix}.{encoded}.{tag[:-1]}",
        f"{prefix}.{tag}.{encoded}",
    ):
        assert open_id(seal, ACME, forged) is None
    assert not bindable("x" * 513) and not bindable("") and not bindable(7)


def test_a_finished_task_is_reported_once() -> None:
    store = TaskStore()
    store.remember(ACME, "up-1")
    assert store.knows(ACME, "up-1") and not store.knows(("globex", "alice", ACME[2]), "up-1")
    assert store.finished(ACME, "up-1") and not store.finished(ACME, "up-1")


def answer(request: Request, result: dict[str, Any]) -> ServerMessage:
    return ServerMessage(
        ServerKind.ANSWER, {"jsonrpc": "2.0", "id": request.message.id, "result": result}, request.message
    )


def created_task(request: Request, upstream_id: str) -> str:
    handle = {"resultType": "task", "taskId": upstream_id, "status": "working", "ttlMs": None}
    message = tasks.created(request, answer(request, handle))
    assert message is not None
    task_id: str = message.body["result"]["taskId"]
    return task_id


async def test_a_listen_stream_carries_the_callers_task_notifications_only() -> None:
    config = make_config()
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "slow"}}
    creator = make_request(config, "acme", call)
    mine = created_task(creator, "up-mine")
    other_tenant = make_request(config, "globex", call, services=creator.services)
    theirs = created_task(other_tenant, "up-theirs")
    listen = make_request(
        config,
        "acme",
        {
            "jsonrpc": "2.0",
            "id": "sub",
            "method": "subscriptions/listen",
            "params": {"notifications": {"taskIds": [mine, theirs, "up-theirs", 5]}},
        },
        services=creator.services,
    )
    await tasks.resolve(listen)
    assert listen.message.params["notifications"]["taskIds"] == ["up-mine"]  # what the upstream is asked

    def notification(method: str, params: dict[str, Any]) -> dict[str, Any] | None:
        message = tasks.notified(
            listen, ServerMessage(ServerKind.NOTIFICATION, {"method": method, "params": params})
        )
        return None if message is None else message.body["params"]

    acknowledged = notification(
        "notifications/subscriptions/acknowledged", {"notifications": {"taskIds": ["up-mine", "up-theirs"]}}
    )
    assert acknowledged == {"notifications": {"taskIds": [mine]}}
    waiting = notification(
        "notifications/tasks",
        {
            "taskId": "up-mine",
            "status": "input_required",
            "inputRequests": {"up-mine:1f": {"method": "elicitation/create", "params": {}}},
        },
    )
    assert (
        waiting is not None and waiting["taskId"] == mine and list(waiting["inputRequests"]) == [f"{mine}:1f"]
    )
    assert notification("notifications/tasks", {"taskId": "up-theirs", "status": "completed"}) is None
    assert notification("notifications/tasks", {"taskId": "up-unknown", "status": "completed"}) is None


@pytest.mark.parametrize("method", ["tasks/get", "tasks/cancel"])
async def test_a_task_request_reaches_the_upstream_under_its_own_id(method: str) -> None:
    config = make_config()
    creator = make_request(config, "acme", {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {}})
    mine = created_task(creator, "up-7")
    request = make_request(
        config,
        "acme",
        {"jsonrpc": "2.0", "id": 2, "method": method, "params": {"taskId": mine}},
        services=creator.services,
    )
    request.upstream_headers = {}
    await tasks.resolve(request)
    assert request.message.params["taskId"] == "up-7"
    assert request.upstream_headers["Mcp-Name"] == "up-7"
    status = answer(request, {"taskId": "up-7", "status": "completed", "resultType": "complete"})
    shown = tasks.answered(request, status)
    assert shown is not None and shown.body["result"]["taskId"] == mine
