"""Upstreams that hand out tasks, for the task tests.

    start_fastmcp_tasks   FastMCP 4.1.4 with fastmcp-tasks 4.1.4: the 2026-07-28 tasks extension,
                          as released (it keeps every unauthenticated caller's tasks in one space,
                          so any id it issued answers whoever presents it)
    start_legacy_tasks    a raw-HTTP server of the 2025-11-25 experimental tasks (task-augmented
                          tools/call, tasks/get, tasks/result, tasks/list, tasks/cancel and
                          notifications/tasks/status): no installable server implements that form
                          faithfully; like the servers that do implement it, it lists every task
                          to every caller

Both run on the tests' upstream thread behind a Recorder, with a per-upstream canary in results.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import mcp_types
from fastmcp import Context, FastMCP
from fastmcp_tasks import TasksExtension
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.upstreams import Recorder, Upstream, UpstreamThread, free_port


def start_fastmcp_tasks(runner: UpstreamThread, canary: str, stateless: bool = False) -> Upstream:
    server = FastMCP("tasks-upstream")
    server.add_extension(TasksExtension(url="memory://"))

    @server.tool(task=True)
    async def slow_canary(seconds: float = 0.0) -> str:
        """Waits, then answers with the canary: run as a task when the client offers tasks."""
        await asyncio.sleep(seconds)
        return f"{canary} after {seconds}s"

    @server.tool(task=True)
    async def ask_name(ctx: Context) -> Any:
        """A task that needs input on the way: it asks the client (elicitation) for a name."""
        answer = (ctx.input_responses or {}).get("name")
        if answer is None:
            request = mcp_types.ElicitRequest(
                params=mcp_types.ElicitRequestFormParams(
                    message="Please enter your name.",
                    requested_schema={"type": "object", "properties": {"name": {"type": "string"}}},
                )
            )
            return mcp_types.InputRequiredResult(input_requests={"name": request})
        content = getattr(answer, "content", None) or {}
        return f"{canary} hello {content.get('name')}"

    recorder = Recorder(server.http_app(stateless_http=stateless or None))
    port = free_port()
    runner.serve(recorder, port)
    return Upstream("tasks", canary, port, recorder)


# --- 2025-11-25 experimental tasks, raw -------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat()


class LegacyTasks:
    """The server's state: sessions (each with its GET stream queue) and every task it made."""

    def __init__(self, canary: str) -> None:
        self.canary = canary
        self.sessions: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self.tasks: dict[str, dict[str, Any]] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.finished: dict[str, asyncio.Event] = {}
        self.creator: dict[str, str] = {}

    def _status(self, task_id: str, status: str, message: str) -> None:
        task = self.tasks[task_id]
        task.update(status=status, statusMessage=message, lastUpdatedAt=_now())
        notification = {"jsonrpc": "2.0", "method": "notifications/tasks/status", "params": dict(task)}
        for queue in self.sessions.values():  # every session hears of every task, as broadcasters do
            queue.put_nowait(notification)
        if status in ("completed", "failed", "cancelled"):
            self.finished[task_id].set()

    async def _run(self, task_id: str, seconds: float, tag: str) -> None:
        await asyncio.sleep(seconds)
        if self.tasks[task_id]["status"] == "working":
            text = f"{self.canary} {tag}"
            self.results[task_id] = {"content": [{"type": "text", "text": text}], "isError": False}
            self._status(task_id, "completed", "done")

    def answer(self, session: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
        if method == "initialize":
            return {
                "protocolVersion": "2025-11-25",
                "serverInfo": {"name": "legacy-tasks", "version": "1"},
                "capabilities": {
                    "tools": {},
                    "tasks": {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}},
                },
            }
        if method == "tools/list":
            schema = {
                "type": "object",
                "properties": {"seconds": {"type": "number"}, "tag": {"type": "string"}},
            }
            tool = {"name": "research", "inputSchema": schema, "execution": {"taskSupport": "optional"}}
            return {"tools": [tool]}
        if method == "tools/call":
            arguments = params.get("arguments") or {}
            seconds, tag = float(arguments.get("seconds", 0)), str(arguments.get("tag", ""))
            if "task" not in params:
                return {"content": [{"type": "text", "text": f"{self.canary} {tag}"}], "isError": False}
            task_id = str(uuid.uuid4())
            now = _now()
            task = {"taskId": task_id, "status": "working", "createdAt": now, "lastUpdatedAt": now}
            self.tasks[task_id] = {**task, "ttl": 60000, "pollInterval": 100}
            self.finished[task_id] = asyncio.Event()
            self.creator[task_id] = session
            asyncio.get_running_loop().create_task(self._run(task_id, seconds, tag))
            return {"task": dict(self.tasks[task_id])}
        if method == "tasks/list":
            return {"tasks": [dict(task) for task in self.tasks.values()]}
        task_id = str(params.get("taskId"))
        if task_id not in self.tasks:
            raise KeyError(f"Task {task_id} not found")
        if method == "tasks/get":
            return dict(self.tasks[task_id])
        if method == "tasks/cancel":
            if self.tasks[task_id]["status"] != "working":
                raise KeyError(f"Task {task_id} is already finished")
            self._status(task_id, "cancelled", "cancelled by the client")
            return dict(self.tasks[task_id])
        raise LookupError(method)

    async def result(self, task_id: Any) -> dict[str, Any]:
        """tasks/result: waits for the task to finish, then its result with the related-task _meta."""
        if task_id not in self.tasks:
            raise KeyError(f"Task {task_id} not found")
        await self.finished[task_id].wait()
        result = self.results.get(task_id, {"content": [], "isError": True})
        return {**result, "_meta": {"io.modelcontextprotocol/related-task": {"taskId": task_id}}}


def legacy_tasks_app(state: LegacyTasks) -> Starlette:
    async def post(request: Request) -> Response:
        message = json.loads(await request.body())
        session = request.headers.get("mcp-session-id")
        method, params = message.get("method"), message.get("params") or {}
        if "id" not in message:
            return Response(status_code=202)
        if method == "initialize":
            session = uuid.uuid4().hex
            state.sessions[session] = asyncio.Queue()
        elif session not in state.sessions:
            return JSONResponse(
                {"jsonrpc": "2.0", "id": None, "error": {"code": -32000, "message": "no session"}}, 404
            )
        headers = {"mcp-session-id": session}
        try:
            if method == "tasks/result":
                result = await state.result(params.get("taskId"))
            else:
                result = state.answer(session, method, params)
        except KeyError as missing:
            error = {"code": -32602, "message": str(missing.args[0])}
            return JSONResponse({"jsonrpc": "2.0", "id": message["id"], "error": error}, headers=headers)
        except LookupError:
            error = {"code": -32601, "message": "Method not found"}
            return JSONResponse({"jsonrpc": "2.0", "id": message["id"], "error": error}, headers=headers)
        return JSONResponse({"jsonrpc": "2.0", "id": message["id"], "result": result}, headers=headers)

    async def get(request: Request) -> Response:
        queue = state.sessions.get(request.headers.get("mcp-session-id", ""))
        if queue is None:
            return Response(status_code=404)

        async def events() -> Any:
            while True:
                yield f"event: message\ndata: {json.dumps(await queue.get())}\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/mcp", post, methods=["POST"]), Route("/mcp", get, methods=["GET"])])


def start_legacy_tasks(runner: UpstreamThread, canary: str) -> tuple[Upstream, LegacyTasks]:
    state = LegacyTasks(canary)
    recorder = Recorder(legacy_tasks_app(state))
    port = free_port()
    runner.serve(recorder, port)
    return Upstream("legacy-tasks", canary, port, recorder), state
