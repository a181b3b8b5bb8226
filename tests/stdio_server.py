"""A real stdio MCP server for the tests: the demo's notes service plus a few test tools.

Run as `python tests/stdio_server.py TENANT CANARY`; it speaks MCP on stdin/stdout until EOF.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
from typing import Any

import anyio
import mcp_types as t
from mcp.server.mcpserver import AcceptedElicitation, Context
from pydantic import BaseModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proxy.demo_upstream import build_notes_server


class Answer(BaseModel):
    answer: str


def main() -> None:
    tenant, canary = sys.argv[1], sys.argv[2]
    server = build_notes_server(tenant, canary)

    @server.tool()
    def environment_names() -> list[str]:
        """The names (never the values) of the environment variables this process got."""
        return sorted(os.environ)

    @server.tool()
    def limits() -> dict[str, list[int]]:
        """The resource limits this process runs under (soft, hard)."""
        kinds = {"memory": resource.RLIMIT_AS, "cpu": resource.RLIMIT_CPU, "files": resource.RLIMIT_NOFILE}
        return {name: list(resource.getrlimit(kind)) for name, kind in kinds.items()}

    @server.tool()
    def allocate(megabytes: int) -> str:
        """Tries to hold that much memory at once."""
        try:
            held = bytearray(megabytes * 1024 * 1024)
        except MemoryError:
            return "refused"
        return f"held {len(held)}"

    @server.tool()
    def open_files(count: int) -> int:
        """How many more files this process could open, up to `count`."""
        opened = []
        try:
            for _ in range(count):
                opened.append(open(os.devnull))  # noqa: SIM115 - held open on purpose
        except OSError:
            pass
        finally:
            for handle in opened:
                handle.close()
        return len(opened)

    @server.tool()
    def crash() -> str:
        """Exits the process at once, as a crashing server would."""
        os._exit(3)

    @server.tool()
    async def ask(question: str, ctx: Context) -> dict[str, Any]:
        """Asks the client (elicitation) and reports the answer."""
        result = await ctx.elicit(question, Answer)
        return {
            "action": result.action,
            "answer": result.data.answer if isinstance(result, AcceptedElicitation) else None,
            "canary": canary,
        }

    events: dict[str, list[str]] = {}

    @server.tool()
    async def slow(tag: str, seconds: float, ctx: Context) -> str:
        """A long call that logs as it goes and records whether it finished or was cancelled."""
        record = events.setdefault(tag, [])
        record.append("started")
        await ctx.info(f"slow {tag} started")
        try:
            await anyio.sleep(seconds)
        except anyio.get_cancelled_exc_class():
            record.append("cancelled")
            raise
        record.append("finished")
        return f"slow {tag} done"

    @server.tool()
    async def chatter(tag: str, n: int, every: float, ctx: Context) -> str:
        """Logs n lines, `every` seconds apart, and goes on doing so after a cancellation (as a tool
        that does not check for one would): its late lines name no request."""
        with anyio.CancelScope(shield=True):
            for index in range(n):
                await ctx.info(f"chatter {tag} {index}")
                await anyio.sleep(every)
        return f"chatter {tag} done"

    background: set[asyncio.Task[None]] = set()

    @server.tool()
    async def background_chatter(tag: str, n: int, every: float, ctx: Context) -> str:
        """Answers at once and goes on logging n lines in the background (a chatty server): those
        lines name no request, and arrive while other calls are in flight."""
        session = ctx.session

        async def chatter_on() -> None:
            for index in range(n):
                await session.send_log_message(level="info", data=f"background {tag} {index}", logger="bg")
                await asyncio.sleep(every)

        task = asyncio.get_running_loop().create_task(chatter_on())
        background.add(task)
        task.add_done_callback(background.discard)
        return f"background {tag} started"

    @server.tool()
    def slow_events(tag: str) -> list[str]:
        """What happened to the slow calls with this tag, in this process."""
        return events.get(tag, [])

    @server.tool()
    async def touch(uri: str, ctx: Context) -> str:
        """Tells subscribers that a resource changed (handshake era: on the session channel)."""
        await ctx.session.send_resource_updated(uri)
        return "sent"

    subscribed: list[str] = []

    async def subscribe(ctx: Any, params: t.SubscribeRequestParams) -> t.EmptyResult:
        subscribed.append(str(params.uri))
        return t.EmptyResult()

    async def unsubscribe(ctx: Any, params: t.UnsubscribeRequestParams) -> t.EmptyResult:
        if str(params.uri) in subscribed:
            subscribed.remove(str(params.uri))
        return t.EmptyResult()

    lowlevel = server._lowlevel_server
    lowlevel.add_request_handler("resources/subscribe", t.SubscribeRequestParams, subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", t.UnsubscribeRequestParams, unsubscribe)

    @server.tool()
    def subscriptions() -> list[str]:
        """The resource URIs this process is subscribed to."""
        return list(subscribed)

    server.run("stdio")


if __name__ == "__main__":
    main()
