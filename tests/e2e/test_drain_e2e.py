"""The stop of a real `proxy run` process: not ready at once, still serving for the drain delay, then
closed; a call still open when the grace ends gets a JSON-RPC error (audited cancelled), sessions
are ended upstream, and the process exits 0 long before that call would have finished."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.protocol.errors import ShuttingDown
from tests.adversarial.proxy_process import ProxyProcess, write_proxy_config
from tests.conftest import MCP_ACCEPT
from tests.e2e.test_transport_e2e import session_headers, sse_messages
from tests.factories import HANDSHAKE_INITIALIZE, RsaKeys
from tests.upstreams import TOOL_EVENTS, free_port

pytestmark = pytest.mark.e2e

CALL_SECONDS = 60  # what the long call would take: the stop must end far sooner
BOUND_SECONDS = 15  # delay + grace + 1 s here is 6 s; generous against a loaded machine


@dataclass
class HoldingUpstream:
    """A handshake-era upstream whose tools/call never answers (the proxy has begun no answer when
    the grace ends: its client gets a JSON answer), and that records the session's end."""

    port: int = field(default_factory=free_port)
    held: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "DELETE":
            self.ended.set()
            return web.Response(status=200)
        body = await request.json()
        if body.get("method") == "initialize":
            result = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
                      "serverInfo": {"name": "holding", "version": "1"}}  # fmt: skip
            answer = {"jsonrpc": "2.0", "id": body["id"], "result": result}
            return web.json_response(answer, headers={"Mcp-Session-Id": "upstream-session"})
        if "id" not in body:
            return web.Response(status=202)
        self.held.set()
        await asyncio.Event().wait()  # until the proxy gives up the call (its connection closes)
        raise AssertionError("unreachable")


@contextlib.asynccontextmanager
async def holding_upstream() -> AsyncIterator[HoldingUpstream]:
    upstream = HoldingUpstream()
    app = web.Application()
    app.router.add_route("*", "/mcp", upstream.handle)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", upstream.port).start()
    try:
        yield upstream
    finally:
        await runner.cleanup()


async def readyz(port: int) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/readyz") as response,
    ):
        return response.status, await response.json()


async def until(check: Any, seconds: float, what: str) -> None:
    """Poll `check` (an async predicate) until it holds, for at most `seconds`."""
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        await asyncio.sleep(0.02)


async def port_closed(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    return False


def call_body(tool: str, arguments: dict[str, Any], request_id: int) -> dict[str, Any]:
    """A handshake-era tools/call asking for progress (its first notification shows it under way)."""
    params = {"name": tool, "arguments": arguments, "_meta": {"progressToken": f"p{request_id}"}}
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


async def open_session(process: ProxyProcess, tenant: str) -> dict[str, str]:
    token = process.client.token(tenant)
    status, headers, _ = await process.client.post(HANDSHAKE_INITIALIZE, token=token)
    assert status == 200
    session = {"Authorization": f"Bearer {token}", **session_headers(headers["Mcp-Session-Id"])}
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert (await process.client.post(initialized, headers=session))[0] == 202
    return session


def audit_records(directory: Path, tenant: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (directory / f"{tenant}.jsonl").read_text().splitlines()]


async def test_sigterm_drains_serves_through_the_delay_and_answers_a_long_call_within_the_bound(
    upstreams: dict[str, Any], tmp_path: Path, rsa_keys: RsaKeys
) -> None:
    async with holding_upstream() as held, aiohttp.ClientSession() as http:
        audit = tmp_path / "audit"
        process = write_proxy_config(
            tmp_path, {"acme": upstreams["acme"], "globex": held.url}, rsa_keys,
            listen={"drain_delay_seconds": 3, "shutdown_grace_seconds": 2}, audit={"dir": str(audit)},
        )  # fmt: skip
        process.start(log_level="info")
        try:
            acme, globex = await open_session(process, "acme"), await open_session(process, "globex")
            tag = f"drain-{time.monotonic_ns()}"
            long_call = call_body("watched_countdown", {"tag": tag, "n": CALL_SECONDS, "delay": 1}, 7)
            streamed = await http.post(process.url, json=long_call, headers={**acme, "Accept": MCP_ACCEPT})
            messages = sse_messages(streamed)
            first = await anext(messages)
            assert first["method"] == "notifications/progress"  # the call is under way upstream
            held_call = call_body("anything", {}, 8)
            unanswered = asyncio.create_task(
                http.post(process.url, json=held_call, headers={**globex, "Accept": MCP_ACCEPT})
            )
            await asyncio.wait_for(held.held.wait(), 10)

            process.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            signalled = time.monotonic()

            async def not_ready() -> bool:
                status, body = await readyz(process.port)
                return status == 503 and body.get("reason") == "draining"

            await until(not_ready, 2, "/readyz turns 503 (draining)")
            served = await process.client.post(call_body("whoami", {}, 9), headers=acme)  # a new connection
            assert served[0] == 200 and upstreams["acme"].canary in served[2].decode()
            await until(lambda: port_closed(process.port), BOUND_SECONDS, "the listener closes")

            rest = [message async for message in messages]
            assert rest[-1] == ShuttingDown().to_jsonrpc(7)  # the stream's last event: the error
            answer = await asyncio.wait_for(unanswered, BOUND_SECONDS)
            assert answer.status == 503 and answer.headers["Retry-After"] == "1"
            assert await answer.json() == ShuttingDown().to_jsonrpc(8)

            code = await asyncio.to_thread(process.process.wait, BOUND_SECONDS)  # type: ignore[union-attr]
            stopped_after = time.monotonic() - signalled
            assert code == 0
            assert stopped_after < BOUND_SECONDS < CALL_SECONDS
            assert TOOL_EVENTS[tag][-1] != "finished"

            assert held.ended.is_set()  # sessions ended upstream, on both upstreams
            assert any(r.method == "DELETE" for r in upstreams["acme"].recorder.snapshot())
            for tenant, tool in (("acme", "watched_countdown"), ("globex", "anything")):
                calls = [r for r in audit_records(audit, tenant) if r["method"] == "tools/call"]
                outcomes = [(r["name"], r["outcome"], r["error_code"]) for r in calls]
                assert (tool, "cancelled", ShuttingDown.code) in outcomes, outcomes
            log = process.stderr_text()
            assert '"event":"grace_over"' in log and '"cut_short":2' in log
        finally:
            process.stop(timeout=5)


async def test_a_second_sigint_skips_the_rest_of_the_delay_and_the_grace(
    upstreams: dict[str, Any], tmp_path: Path, rsa_keys: RsaKeys
) -> None:
    process = write_proxy_config(
        tmp_path, upstreams, rsa_keys, listen={"drain_delay_seconds": 60, "shutdown_grace_seconds": 60}
    )
    process.start(log_level="info")
    try:
        acme = await open_session(process, "acme")
        long_call = call_body("countdown", {"n": CALL_SECONDS, "delay": 1}, 3)
        async with aiohttp.ClientSession() as http:
            streamed = await http.post(process.url, json=long_call, headers={**acme, "Accept": MCP_ACCEPT})
            messages = sse_messages(streamed)
            assert (await anext(messages))["method"] == "notifications/progress"
            process.process.send_signal(signal.SIGINT)  # type: ignore[union-attr]

            async def not_ready() -> bool:
                return (await readyz(process.port))[0] == 503

            await until(not_ready, 5, "/readyz turns 503")
            process.process.send_signal(signal.SIGINT)  # type: ignore[union-attr]
            hurried = time.monotonic()
            rest = [message async for message in messages]
            assert rest[-1] == ShuttingDown().to_jsonrpc(3)
            assert await asyncio.to_thread(process.process.wait, BOUND_SECONDS) == 0  # type: ignore[union-attr]
            assert time.monotonic() - hurried < BOUND_SECONDS
    finally:
        process.stop(timeout=5)
