"""Tasks, in both forms: a task an upstream runs is reachable only by the caller that started it.

    2026-07-28, extension io.modelcontextprotocol/tasks (SEP-2663): tools/call answered with
        {resultType: "task", taskId, ...}; tasks/get (status, inputRequests, the result once done),
        tasks/update (inputResponses), tasks/cancel, with Mcp-Name = taskId; notifications/tasks
        on a subscriptions/listen stream that names the task (notifications.taskIds)
    2025-11-25, experimental (SEP-1686): a request with params.task answered {task: {taskId, ...}};
        tasks/get, tasks/result (the result, _meta related-task), tasks/list, tasks/cancel;
        notifications/tasks/status on the session's streams

Clients see only the proxy's task ids, the upstream only its own (task_store.py: an id bound to
the caller's tenant, principal (issuer and subject) and upstream). In the flow:

    resolve    stage: a task request names one of the caller's tasks, or gets exactly the answer of
               an unknown task (-32602) without an upstream call; the upstream gets its own id
               (taskId, Mcp-Name, inputResponses keys); a listen keeps the caller's task ids only;
               a task list learns which tasks are the caller's
    created    response hook: a task handle gets the proxy's id; the caller is its owner (audit)
    answered   response hook: answers about a task carry the proxy's id; tasks/list shows only the
               caller's tasks; input the policy answers or refuses is taken out of inputRequests;
               a task seen finishing is audited once
    notified   response hook: notifications about the caller's tasks carry the proxy's ids; those
               about any other task are dropped
    untie      response hook: a server-to-client request tied to a task (_meta related-task) keeps
               the tie only to a task of the caller
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
from typing import Any, Final

import structlog

from proxy import __version__
from proxy.flow import Call, Request, ServerKind, ServerMessage
from proxy.layers.containment.capabilities import own_answer
from proxy.layers.containment.extensions import TASKS_EXTENSION
from proxy.layers.sessions.task_store import Owner, bindable, issue, open_id
from proxy.protocol.errors import InvalidParams, ProxyError, UnknownTask, UpstreamError
from proxy.protocol.headers import NAME_HEADER, encode_header_value
from proxy.protocol.jsonrpc import TASK_ID_METHODS, MessageKind, dumps
from proxy.types import LATEST_MODERN_VERSION, Era, JsonObject
from proxy.upstreams.base import UpstreamRequest

log = structlog.get_logger("proxy.layers.sessions.tasks")

CREATING_METHODS: Final = ("tools/call", "prompts/get", "resources/read")
ANSWERED_METHODS: Final = (*sorted(TASK_ID_METHODS), "tasks/list")
NOTIFICATIONS: Final = (
    "notifications/tasks",
    "notifications/tasks/status",
    "notifications/subscriptions/acknowledged",
)
RELATED_TASK: Final = "io.modelcontextprotocol/related-task"
TERMINAL: Final = frozenset({"completed", "failed", "cancelled"})
_LISTENING = "tasks.listening"  # a listen's tasks: upstream id -> the proxy's id
_OWNED = "tasks.owned"  # the caller's upstream task ids, for tasks/list
_ids = itertools.count(1)
_SENT_SOON: set[asyncio.Task[None]] = set()


def owner_of(call: Call) -> Owner:
    return (call.ctx.tenant, call.ctx.principal, call.tenant.upstream.identity)


def _proxy_id(call: Call, upstream_id: str) -> str:
    return issue(call.services.request_states, owner_of(call), upstream_id)


def _audit(call: Call, task_id: str, event: str | None = None) -> None:
    call.task = hashlib.sha256(task_id.encode()).hexdigest()[:16]
    if event is not None:
        call.task_event = event


# --- the way up ------------------------------------------------------------------------------------


async def resolve(call: Request) -> None:
    """Task requests name the caller's own tasks (stage); the upstream gets its own ids."""
    message = call.message
    if message.kind is not MessageKind.REQUEST:
        return
    if message.method in TASK_ID_METHODS:
        _name_upstream_task(call)
    elif message.method == "tasks/list":
        call.slots[_OWNED] = await call.services.tasks.owned(owner_of(call))
    elif message.method == "subscriptions/listen":
        _listen_to_own_tasks(call)


def _name_upstream_task(call: Request) -> None:
    params = call.message.body.get("params")
    task_id = params.get("taskId") if isinstance(params, dict) else None
    if not isinstance(params, dict) or not isinstance(task_id, str):
        raise InvalidParams("Invalid params: taskId must be a string")
    upstream_id = open_id(call.services.request_states, owner_of(call), task_id)
    if upstream_id is None:  # unknown, foreign, forged, or from before a change of upstream
        raise UnknownTask()
    params["taskId"] = upstream_id
    responses = params.get("inputResponses")
    if isinstance(responses, dict):  # keys may embed the task id (FastMCP: "<taskId>:<hex>")
        params["inputResponses"] = {str(k).replace(task_id, upstream_id): v for k, v in responses.items()}
    if call.era is Era.MODERN:
        call.upstream_headers[NAME_HEADER] = encode_header_value(upstream_id)
    _audit(call, task_id)


def _listen_to_own_tasks(call: Request) -> None:
    params = call.message.params
    wanted = params.get("notifications")
    task_ids = wanted.get("taskIds") if isinstance(wanted, dict) else None
    if not isinstance(wanted, dict) or not isinstance(task_ids, list):
        return
    listening: dict[str, str] = {}
    for task_id in task_ids:
        upstream_id = (
            open_id(call.services.request_states, owner_of(call), task_id)
            if isinstance(task_id, str)
            else None
        )
        if upstream_id is not None:  # another's task is simply not subscribed to, as an unknown one
            listening[upstream_id] = task_id
    params["notifications"] = {**wanted, "taskIds": list(listening)}
    call.slots[_LISTENING] = listening


# --- the way back ----------------------------------------------------------------------------------


def created(call: Call, message: ServerMessage) -> ServerMessage | None:
    """A task handle (2026-07-28 resultType "task", 2025-11-25 {task: {...}}) gets the proxy's id."""
    result = message.body.get("result")
    if message.kind is not ServerKind.ANSWER or message.answers is None or not isinstance(result, dict):
        return message
    flat = result.get("resultType") == "task"
    handle = result if flat else result.get("task")
    if not isinstance(handle, dict) or "taskId" not in handle:
        return message
    upstream_id = handle["taskId"]
    if not bindable(upstream_id):  # an id no caller could be given: fail closed
        refusal = UpstreamError("The upstream MCP server answered with a task id the proxy cannot use")
        call.outcome, call.error_code, call.upstream_fault = "error", refusal.code, True
        message.body = refusal.to_jsonrpc(message.answers.id)
        return message
    call.services.tasks.remember(owner_of(call), upstream_id)
    task_id = _proxy_id(call, upstream_id)
    handle = {**handle, "taskId": task_id}
    message.body = {**message.body, "result": handle if flat else {**result, "task": handle}}
    _audit(call, task_id, "created")
    log.info("task_created", tenant=call.ctx.tenant, subject_hash=call.subject_hash, task=call.task)
    return message


def answered(call: Call, message: ServerMessage) -> ServerMessage | None:
    """Answers about a task carry the proxy's id; a list shows the caller's tasks only."""
    request = message.answers
    if message.kind is not ServerKind.ANSWER or request is None:
        return message
    body, result = message.body, message.body.get("result")
    if request.method == "tasks/list":
        if isinstance(result, dict):
            message.body = {**body, "result": _own_tasks(call, result)}
        return message
    upstream_id = request.params.get("taskId")  # (resolve put the upstream's id there)
    if not isinstance(upstream_id, str):
        return message
    task_id = _proxy_id(call, upstream_id)
    error = body.get("error")
    if isinstance(error, dict):
        text = str(error.get("message", ""))
        message.body = {**body, "error": {**error, "message": text.replace(upstream_id, task_id)}}
        return message
    if not isinstance(result, dict):
        return message
    result = _outward(call, result, upstream_id, task_id)
    if request.method == "tasks/result":  # the final result itself (2025-11-25)
        failed = result.get("isError") is True
        _finished(call, upstream_id, task_id, "failed" if failed else "completed")
    elif result.get("status") in TERMINAL:
        _finished(call, upstream_id, task_id, str(result["status"]))
    message.body = {**body, "result": result}
    return message


def notified(call: Call, message: ServerMessage) -> ServerMessage | None:
    """Notifications about tasks: the caller's only, under the proxy's ids."""
    params = message.body.get("params")
    if not isinstance(params, dict):
        return message
    listening: dict[str, str] = call.slots.get(_LISTENING, {})
    if message.method == "notifications/subscriptions/acknowledged":
        wanted = params.get("notifications")
        if isinstance(wanted, dict) and isinstance(wanted.get("taskIds"), list):
            echoed = [listening[i] for i in wanted["taskIds"] if isinstance(i, str) and i in listening]
            message.body = {
                **message.body,
                "params": {**params, "notifications": {**wanted, "taskIds": echoed}},
            }
        return message
    upstream_id = params.get("taskId")
    if not isinstance(upstream_id, str):
        return None
    task_id = listening.get(upstream_id)
    if task_id is None and call.services.tasks.knows(owner_of(call), upstream_id):
        task_id = _proxy_id(call, upstream_id)
    if task_id is None:
        return None  # not a task of the caller's (an upstream that tells everyone of every task)
    params = _outward(call, params, upstream_id, task_id)
    if params.get("status") in TERMINAL:
        _finished(call, upstream_id, task_id, str(params["status"]))
    message.body = {**message.body, "params": params}
    if isinstance(message.body.get("_meta"), dict):  # (some servers put related-task beside params)
        message.body["_meta"] = _related(call, message.body["_meta"])
    return message


def untie(call: Call, message: ServerMessage) -> ServerMessage | None:
    """A server-to-client request tied to a task (elicitation while a task waits, 2025-11-25)."""
    params = message.body.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    if isinstance(params, dict) and isinstance(meta, dict) and RELATED_TASK in meta:
        message.body = {**message.body, "params": {**params, "_meta": _related(call, meta)}}
    return message


# --- ids and input in what comes back --------------------------------------------------------------


def _outward(call: Call, found: JsonObject, upstream_id: str, task_id: str) -> JsonObject:
    """A task (or a task's result) as the client sees it: the proxy's id wherever the upstream's was."""
    out = dict(found)
    if out.get("taskId") == upstream_id:
        out["taskId"] = task_id
    requests = out.get("inputRequests")
    if isinstance(requests, dict):
        out["inputRequests"] = _settle_input(call, requests, upstream_id, task_id)
    if isinstance(out.get("_meta"), dict):
        out["_meta"] = _related(call, out["_meta"])
    return out


def _related(call: Call, meta: JsonObject) -> JsonObject:
    """_meta's related-task under the proxy's id when the task is the caller's; dropped otherwise."""
    related = meta.get(RELATED_TASK)
    if not isinstance(related, dict):
        return meta
    upstream_id = related.get("taskId")
    kept = {k: v for k, v in meta.items() if k != RELATED_TASK}
    if isinstance(upstream_id, str) and call.services.tasks.knows(owner_of(call), upstream_id):
        kept[RELATED_TASK] = {**related, "taskId": _proxy_id(call, upstream_id)}
    return kept


def _own_tasks(call: Call, result: JsonObject) -> JsonObject:
    owned: frozenset[str] = call.slots.get(_OWNED, frozenset())
    tasks = result.get("tasks")
    mine = [
        {**task, "taskId": _proxy_id(call, task["taskId"])}
        for task in (tasks if isinstance(tasks, list) else [])
        if isinstance(task, dict) and task.get("taskId") in owned
    ]
    return {**result, "tasks": mine}


def _finished(call: Call, upstream_id: str, task_id: str, status: str) -> None:
    if call.services.tasks.finished(owner_of(call), upstream_id):
        _audit(call, task_id, status)


def _settle_input(call: Call, requests: JsonObject, upstream_id: str, task_id: str) -> JsonObject:
    """A waiting task's inputRequests as the client may see them (keys under the proxy's id): what
    the policy answers itself (roots) is answered to the upstream by the proxy, what it refuses
    never reaches the client (as capabilities.settle_input does for input_required results)."""
    kept: JsonObject = {}
    answers: JsonObject = {}
    for key, asked in requests.items():
        method = asked.get("method") if isinstance(asked, dict) else None
        own = own_answer(call, {"method": method}) if isinstance(method, str) else None
        if own is None:
            kept[str(key).replace(upstream_id, task_id)] = asked
        elif isinstance(own.get("result"), dict):
            answers[str(key)] = own["result"]
    if answers and call.era is Era.MODERN:
        _update_soon(call, upstream_id, answers)
    return kept


def _update_soon(call: Call, upstream_id: str, responses: JsonObject) -> None:
    """tasks/update to the upstream with the proxy's own answers, the exchange not waiting for it."""
    meta = {
        "io.modelcontextprotocol/protocolVersion": LATEST_MODERN_VERSION,
        "io.modelcontextprotocol/clientCapabilities": {"extensions": {TASKS_EXTENSION: {}}},
        "io.modelcontextprotocol/clientInfo": {"name": "mcp-tenant-proxy", "version": __version__},
    }
    params = {"taskId": upstream_id, "inputResponses": responses, "_meta": meta}
    body = {"jsonrpc": "2.0", "id": f"mcp-tenant-proxy-task-{next(_ids)}", "method": "tasks/update"}
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": LATEST_MODERN_VERSION,
        "Mcp-Method": "tasks/update",
        NAME_HEADER: encode_header_value(upstream_id),
    }
    upstream = call.tenant.upstream
    request = UpstreamRequest("POST", headers, dumps({**body, "params": params}))

    async def send() -> None:
        with contextlib.suppress(ProxyError):
            (await upstream.send(request)).close()

    task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(send())
    _SENT_SOON.add(task)
    task.add_done_callback(_SENT_SOON.discard)
