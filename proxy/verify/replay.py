"""Ids one tenant holds, replayed by another (`verify --probe`): each must get what an unknown id gets.

sessions       a handshake-era session id of A, sent by B on POST, GET and DELETE (404 expected;
               A's session must survive B's DELETE)
request state  a 2026-07-28 input_required `requestState` A was given, sent back by B with
               B's own arguments (sealed to its caller: refused)
tasks          task ids A created (the tasks extension, or 2025-11-25 `params.task`), asked
               for by B with tasks/get, and looked for in B's tasks/list
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

from proxy.types import Era, JsonObject
from proxy.verify.client import McpClient, VerifyError
from proxy.verify.probe import Party
from proxy.verify.report import Finding, Report, Severity

OpenClient = Callable[[str, Era], Awaitable[McpClient]]
TASKS_EXTENSION: Final = "io.modelcontextprotocol/tasks"
TASK_CAPABILITIES: Final[JsonObject] = {"extensions": {TASKS_EXTENSION: {}}}
MAX_TASK_TOOLS: Final = 3
_PROXY_BUG: Final = "# no policy setting covers this: it is the proxy's own isolation. Report it.\n"


def _replay_finding(
    check: str, victim: Party, attacker: Party, target: str, title: str, evidence: str
) -> Finding:
    return Finding(check, Severity.HIGH, attacker.tenant, target, title, (evidence,), _PROXY_BUG, None)


async def replay_session(open_client: OpenClient, victim: Party, attacker: Party, report: Report) -> None:
    try:
        own = await open_client(victim.tenant, Era.HANDSHAKE)
        other = await open_client(attacker.tenant, Era.HANDSHAKE)
    except VerifyError as exc:
        report.notes.append(f"session replay not probed: no handshake-era session ({exc})")
        return
    session = own.session_id
    if session is None:
        report.notes.append("session replay not probed: initialize gave no Mcp-Session-Id")
        return
    as_whom = f"with {victim.tenant}'s Mcp-Session-Id as {attacker.tenant}"

    def found(http_method: str, title: str, seen: str) -> None:
        check = "probe-session-replay"
        report.add(_replay_finding(check, victim, attacker, f"Mcp-Session-Id:{http_method}", title, seen))

    reply = await other.request("tools/list", as_session=session)
    if reply.result is not None:
        title = f"{attacker.tenant} used {victim.tenant}'s session id and was answered on it."
        found("POST", title, f"POST tools/list {as_whom}: {reply.describe()}")
    status = await other.get_stream(session)
    if status < 300:
        found(
            "GET",
            f"{attacker.tenant} opened the stream of {victim.tenant}'s session.",
            f"GET {as_whom}: {status}",
        )
    status = await other.delete(session)
    survived = (await own.request("tools/list")).result is not None
    if status < 300 or not survived:
        after = "still works" if survived else "no longer works"
        seen = f"DELETE {as_whom}: HTTP {status}; {victim.tenant}'s session {after}"
        found("DELETE", f"{attacker.tenant} ended {victim.tenant}'s session.", seen)


def _declined(request: object) -> JsonObject:
    """An answer to an input request that gives nothing away."""
    method = request.get("method") if isinstance(request, dict) else None
    if method == "sampling/createMessage":
        return {"role": "assistant", "content": {"type": "text", "text": "verify"}, "model": "verify"}
    if method == "roots/list":
        return {"roots": []}
    return {"action": "decline"}


async def replay_request_state(victim: Party, attacker: Party, report: Report) -> None:
    for state in victim.input_states[:MAX_TASK_TOOLS]:
        tool = attacker.view.inventory.tool(state.tool)
        if tool is None:
            continue
        params = {
            "name": state.tool,
            "arguments": attacker.arguments(tool, attacker.tenant, "", False),
            "requestState": state.request_state,
            "inputResponses": {key: _declined(request) for key, request in state.input_requests.items()},
        }
        try:
            reply = await attacker.client.request("tools/call", params)
        except VerifyError as exc:
            report.notes.append(f"request-state replay of {state.tool}: {exc}")
            continue
        if reply.ok:
            title = f"{attacker.tenant} retried {state.tool} with {victim.tenant}'s requestState: accepted."
            seen = f"tools/call {state.tool} as {attacker.tenant} with {victim.tenant}'s requestState"
            seen += f": {reply.describe()}"
            report.add(
                _replay_finding("probe-request-state-replay", victim, attacker, state.tool, title, seen)
            )


async def create_tasks(party: Party, report: Report) -> None:
    """Have the party start tasks, where its tools offer them."""
    modern = party.client.era is Era.MODERN
    extensions = party.client.server_capabilities.get("extensions")
    if modern and not (isinstance(extensions, dict) and TASKS_EXTENSION in extensions):
        return
    started = 0
    for tool in party.probed_tools():
        execution = tool.get("execution")
        support = execution.get("taskSupport") if isinstance(execution, dict) else None
        if started >= MAX_TASK_TOOLS or (not modern and support not in ("optional", "required")):
            continue
        params: JsonObject = {
            "name": tool["name"],
            "arguments": party.arguments(tool, party.tenant, "", False),
        }
        if not modern:
            params["task"] = {}
        try:
            reply = await party.client.request("tools/call", params, capabilities=TASK_CAPABILITIES)
        except VerifyError as exc:
            report.notes.append(f"{party.tenant}: tools/call {tool['name']} as a task: {exc}")
            continue
        result = reply.result or {}
        task = result.get("task") if not modern else result if result.get("resultType") == "task" else None
        task_id = task.get("taskId") if isinstance(task, dict) else None
        if isinstance(task_id, str):
            party.task_ids.append(task_id)
            started += 1


async def replay_tasks(victim: Party, attacker: Party, report: Report) -> None:
    if victim.task_ids:  # said, so that a clean report shows what it covered
        count, owner = len(victim.task_ids), victim.tenant
        report.notes.append(f"task replay: {count} task id(s) of {owner} asked for as {attacker.tenant}")
    for task_id in victim.task_ids:
        try:
            reply = await attacker.client.request(
                "tasks/get", {"taskId": task_id}, capabilities=TASK_CAPABILITIES
            )
        except VerifyError as exc:
            report.notes.append(f"task replay: {exc}")
            continue
        if reply.result is not None:
            title = f"{attacker.tenant} read the state of a task {victim.tenant} started."
            seen = f"tasks/get of {victim.tenant}'s task as {attacker.tenant}: {reply.describe()}"
            report.add(_replay_finding("probe-task-replay", victim, attacker, "tasks/get", title, seen))
    if victim.task_ids and attacker.client.era is Era.HANDSHAKE:
        listing = await attacker.client.request("tasks/list", {})
        if any(task_id in listing.text for task_id in victim.task_ids):
            title = f"tasks/list shows {attacker.tenant} a task {victim.tenant} started."
            seen = f"tasks/list as {attacker.tenant}: {listing.describe()}"
            report.add(_replay_finding("probe-task-replay", victim, attacker, "tasks/list", title, seen))
