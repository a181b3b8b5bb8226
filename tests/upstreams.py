"""Real upstream MCP servers for end-to-end tests: SDK MCPServer apps on loopback, one per tenant.

They run under uvicorn on their own event loop in a background thread, each behind a recorder
that keeps every HTTP request it received (method, headers, body), so a test can assert what did,
and what did not, reach an upstream.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import anyio
import uvicorn
from mcp.server.mcpserver import Context, Elicit, ListRoots, MCPServer, Resolve, Sample
from mcp.server.streamable_http import EventCallback, EventMessage, EventStore
from mcp_types import (
    Completion,
    CreateMessageResult,
    JSONRPCMessage,
    ListRootsResult,
    SamplingMessage,
    TextContent,
)
from pydantic import BaseModel

from proxy.demo_upstream import build_notes_server

ASGIApp = Callable[..., Any]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytearray = field(default_factory=bytearray)
    query: str = ""

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class Recorder:
    """ASGI middleware that remembers every HTTP request an app received."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.requests: list[Recorded] = []
        self.lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = Recorded(
            scope["method"],
            scope["path"],
            {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]},
            query=scope.get("query_string", b"").decode("latin-1"),
        )
        with self.lock:
            self.requests.append(record)

        async def recording_receive() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                record.body += message.get("body", b"")
            return message

        await self.app(scope, recording_receive, send)

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()

    def snapshot(self) -> list[Recorded]:
        """The requests received for clients: the proxy's own era probe (one server/discover per
        upstream and runtime, upstreams/eras.py) is left out; `probes()` has it."""
        with self.lock:
            return [r for r in self.requests if not is_era_probe(r.body)]

    def probes(self) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if is_era_probe(r.body)]


def is_era_probe(body: bytes | bytearray) -> bool:
    """The proxy's server/discover probe of an upstream's protocol eras."""
    return b'"id":"mcp-tenant-proxy-discover-' in body


def add_test_tools(server: MCPServer, canary: str) -> None:
    """Tools the tests need beyond the demo's notes service."""

    @server.tool()
    async def countdown(n: int, delay: float, ctx: Context) -> dict[str, Any]:
        """Reports progress n times, `delay` seconds apart, then answers."""
        for step in range(n):
            await ctx.report_progress(step + 1, n, f"step {step + 1}")
            await anyio.sleep(delay)
        return {"done": n, "canary": canary}

    @server.tool()
    def read_document(doc: str) -> dict[str, Any]:
        """The tenant a JSON document names, decoding `doc` until it is no longer a string, as a server
        accepting documents that clients JSON-encoded more than once does."""
        value: Any = doc
        for _ in range(4):
            if not isinstance(value, str):
                break
            try:
                value = json.loads(value)
            except ValueError:
                break
        named = value.get("tenant_id") if isinstance(value, dict) else None
        return {"tenant_id": named, "canary": canary}

    @server.tool()
    def fail(message: str) -> str:
        """Always raises: the answer is an isError result."""
        raise RuntimeError(message)

    @server.tool()
    async def watched_countdown(tag: str, n: int, delay: float, ctx: Context) -> dict[str, Any]:
        """countdown that records in TOOL_EVENTS[tag] each step, and whether it finished or was cancelled."""
        events = TOOL_EVENTS.setdefault(tag, [])
        events.append("started")
        try:
            for step in range(n):
                await ctx.report_progress(step + 1, n, f"step {step + 1}")
                events.append(f"step {step + 1}")
                await anyio.sleep(delay)
        except anyio.get_cancelled_exc_class():
            events.append("cancelled")
            raise
        events.append("finished")
        return {"done": n, "canary": canary}

    @server.tool()
    async def ask_model(
        topic: str, answer: Annotated[CreateMessageResult, Resolve(_sample_about)]
    ) -> dict[str, Any]:
        """Asks the client's model (sampling) about `topic` and returns what it answered."""
        text = answer.content.text if isinstance(answer.content, TextContent) else None
        return {"model": answer.model, "text": text, "canary": canary}

    @server.tool()
    async def broadcast_update(uri: str, ctx: Context) -> str:
        """Tells the caller's session that a resource changed, and logs it: an upstream broadcasting
        what it knows to whoever is connected (as a careless shared server does)."""
        await ctx.session.send_resource_updated(uri)
        await ctx.info(f"updated {uri}")
        return "announced"

    @server.tool()
    async def show_roots(roots: Annotated[ListRootsResult, Resolve(_list_roots)]) -> dict[str, Any]:
        """The client's roots, as a filesystem server would adopt them."""
        return {"roots": [str(root.uri) for root in roots.roots], "canary": canary}

    # The SDK's completion() decorator has no annotations (its sibling decorators have).
    @server.completion()  # type: ignore[no-untyped-call, untyped-decorator]
    async def complete(ref: Any, argument: Any, context: Any) -> Completion:
        """Completes from the tenant named in the context, as a tenant-aware server trusting it would."""
        arguments = (context.arguments if context is not None else None) or {}
        named = arguments.get("tenant") or arguments.get("tenant_id") or "nobody"
        return Completion(values=[f"{named}-{argument.name}-{canary}"])

    @server.tool()
    async def ask_user_on_session(topic: str, ctx: Context) -> dict[str, Any]:
        """ask_user, with the elicitation sent on the session's GET stream (no related request), as
        servers that ask on the standalone stream do (handshake era only)."""
        schema = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}
        answer = await ctx.session.elicit_form(f"Pick a colour for {topic}", schema)
        colour = (answer.content or {}).get("colour")
        return {"topic": topic, "colour": colour, "canary": canary}

    @server.tool()
    async def ask_org(topic: str, choice: Annotated[OrgChoice, Resolve(_elicit_org)]) -> dict[str, Any]:
        """Asks the user (elicitation) which organisation's notes to use: a tenant-trusting server."""
        return {"topic": topic, "org_id": choice.org_id, "canary": canary}

    @server.tool()
    async def ask_user(
        topic: str, choice: Annotated[ColourChoice, Resolve(_elicit_colour)]
    ) -> dict[str, Any]:
        """Asks the user (elicitation) to pick a colour for `topic` and returns the choice."""
        return {"topic": topic, "colour": choice.colour, "canary": canary}


# What watched_countdown saw, by the tag the test gave it (the upstream runs in another thread).
TOOL_EVENTS: dict[str, list[str]] = {}


class ColourChoice(BaseModel):
    colour: str


class OrgChoice(BaseModel):
    org_id: str


def _elicit_org(topic: str) -> Elicit[OrgChoice]:
    return Elicit(f"Which organisation's notes about {topic}?", OrgChoice)


def _list_roots() -> ListRoots:
    return ListRoots()


def _sample_about(topic: str) -> Sample:
    prompt = TextContent(type="text", text=f"Say something about {topic}")
    return Sample([SamplingMessage(role="user", content=prompt)], max_tokens=50)


def _elicit_colour(topic: str) -> Elicit[ColourChoice]:
    return Elicit(f"Pick a colour for {topic}", ColourChoice)


@dataclass
class Upstream:
    tenant: str
    canary: str
    port: int
    recorder: Recorder

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"


class UpstreamThread:
    """Runs uvicorn servers on one event loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.servers: list[uvicorn.Server] = []
        self.tasks: list[Any] = []
        self.thread.start()

    def serve(self, app: ASGIApp, port: int) -> None:
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", ws="none")
        )
        self.servers.append(server)
        self.tasks.append(asyncio.run_coroutine_threadsafe(server.serve(), self.loop))
        deadline = time.monotonic() + 20
        while not server.started:
            if self.tasks[-1].done():
                self.tasks[-1].result()
            if time.monotonic() > deadline:
                raise RuntimeError("upstream did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        for server in self.servers:
            server.should_exit = True
        for task in self.tasks:
            task.result(timeout=10)
        # Whatever the servers left behind (SSE shutdown watchers) is cancelled and awaited, so
        # nothing is destroyed while pending when the loop stops.
        asyncio.run_coroutine_threadsafe(_cancel_leftovers(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


async def _cancel_leftovers() -> None:
    current = asyncio.current_task()
    leftovers = [task for task in asyncio.all_tasks() if task is not current]
    for task in leftovers:
        task.cancel()
    await asyncio.gather(*leftovers, return_exceptions=True)


def start_notes_upstream(runner: UpstreamThread, tenant: str, canary: str) -> Upstream:
    server = build_notes_server(tenant, canary)
    add_test_tools(server, canary)
    recorder = Recorder(server.streamable_http_app(host="127.0.0.1"))
    port = free_port()
    runner.serve(recorder, port)
    return Upstream(tenant, canary, port, recorder)


# --- helpers for the concurrency and ownership suites ---------------------------------------------


class MemoryEventStore(EventStore):
    """An SDK EventStore in memory, so an upstream's SSE streams are resumable with Last-Event-ID.

    Its ids ("up-N") differ from the proxy's own. It lives on the upstream thread's loop only.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, str, JSONRPCMessage | None]] = []

    async def store_event(self, stream_id: str, message: JSONRPCMessage | None) -> str:
        event_id = f"up-{len(self.events) + 1}"
        self.events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(self, last_event_id: str, send_callback: EventCallback) -> str | None:
        ids = [event[0] for event in self.events]
        if last_event_id not in ids:
            return None
        position = ids.index(last_event_id)
        stream = self.events[position][1]
        for event_id, stream_id, message in self.events[position + 1 :]:
            if stream_id == stream and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream


class Delayed:
    """ASGI middleware that holds every POST for `delay` seconds before the app sees it."""

    def __init__(self, app: ASGIApp, delay: float) -> None:
        self.app = app
        self.delay = delay

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            await anyio.sleep(self.delay)
        await self.app(scope, receive, send)


def add_notification_tools(server: MCPServer) -> None:
    """A tool whose notifications carry a caller-chosen marker, on both of a session's channels."""
    from mcp_types import LoggingMessageNotification, LoggingMessageNotificationParams

    def log_message(text: str) -> LoggingMessageNotification:
        return LoggingMessageNotification(params=LoggingMessageNotificationParams(level="info", data=text))

    @server.tool()
    async def announce(marker: str, ctx: Context) -> dict[str, Any]:
        """Progress and a log message on this request's stream, and a log message on the session's
        standalone (GET) stream, each naming `marker`."""
        session = ctx.request_context.session
        await ctx.report_progress(1, 1, f"progress {marker}")
        request_log = log_message(f"request-log {marker}")
        await session.send_notification(request_log, related_request_id=ctx.request_id)
        await session.send_notification(log_message(f"session-log {marker}"))
        return {"marker": marker}


def start_test_upstream(
    runner: UpstreamThread,
    tenant: str,
    canary: str,
    *,
    resumable: bool = False,
    post_delay: float = 0.0,
) -> Upstream:
    """A notes upstream with every test tool; optionally resumable (event store) or slow to answer POSTs."""
    server = build_notes_server(tenant, canary)
    add_test_tools(server, canary)
    add_notification_tools(server)
    app: ASGIApp = server.streamable_http_app(
        host="127.0.0.1", event_store=MemoryEventStore() if resumable else None
    )
    if post_delay:
        app = Delayed(app, post_delay)
    recorder = Recorder(app)
    port = free_port()
    runner.serve(recorder, port)
    return Upstream(tenant, canary, port, recorder)


def start_resumable_upstream(runner: UpstreamThread, tenant: str, canary: str) -> Upstream:
    """A notes upstream that polls (SEP-1699): its streams start with a priming event and a retry
    of 100 ms, and `close_then_finish` closes its POST stream mid-call, answering on the resumed GET."""
    server = build_notes_server(tenant, canary)

    @server.tool()
    async def close_then_finish(ctx: Context, seconds: float = 0.3) -> str:
        """Reports progress, closes this request's stream, works on, reports again and answers."""
        await ctx.report_progress(1, 2)
        await ctx.close_sse_stream()
        await anyio.sleep(seconds)
        await ctx.report_progress(2, 2)
        return f"finished after the stream was closed {canary}"

    app = server.streamable_http_app(host="127.0.0.1", event_store=MemoryEventStore(), retry_interval=100)
    recorder = Recorder(app)
    port = free_port()
    runner.serve(recorder, port)
    return Upstream(tenant, canary, port, recorder)


# --- an upstream in a process of its own, so that a test can kill it for real ---------------------


def serve_test_upstream(tenant: str, canary: str, port: int) -> None:
    """start_test_upstream(resumable=True)'s server, in the foreground of this process."""
    server = build_notes_server(tenant, canary)
    add_test_tools(server, canary)
    add_notification_tools(server)
    app = server.streamable_http_app(host="127.0.0.1", event_store=MemoryEventStore())
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", ws="none")


@dataclass
class UpstreamProcess:
    """A resumable notes upstream with every test tool, run by `python -m tests.upstreams` in a child
    process: `kill()` is a SIGKILL (the kernel drops its connections, nothing shuts down cleanly)
    and `start()` brings a fresh process (no notes, no sessions) up on the same port."""

    tenant: str
    canary: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def spawn(self) -> None:
        """Start the process without waiting for it to listen (see `wait_until_listening`)."""
        assert self.process is None or self.process.poll() is not None, "already running"
        root = Path(__file__).resolve().parent.parent
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.upstreams", self.tenant, self.canary, str(self.port)],
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait_until_listening(self, timeout: float = 30.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"upstream process exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("upstream process did not start listening") from None
                time.sleep(0.05)

    def start(self, timeout: float = 30.0) -> None:
        self.spawn()
        self.wait_until_listening(timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


if __name__ == "__main__":  # python -m tests.upstreams TENANT CANARY PORT
    serve_test_upstream(sys.argv[1], sys.argv[2], int(sys.argv[3]))
