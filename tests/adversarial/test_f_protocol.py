"""THREATS F beyond framing: a bad protocol version on a session, and bounded memory.

The version tests run against the in-process proxy. The memory tests run the proxy the way
operators do (`python -m proxy run`, see proxy_process.py) so that its resident memory can be read
from /proc/PID/status while it refuses 200 hostile connections at once, and while a client reads a
fast upstream's progress stream very slowly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from mcp.server.mcpserver import Context, MCPServer

from proxy.types import HANDSHAKE_VERSIONS
from tests.adversarial.proxy_process import ProxyProcess, write_proxy_config
from tests.conftest import TENANTS, RunningProxy
from tests.e2e.test_transport_e2e import (
    call_body,
    error_of,
    initialize,
    modern_headers,
    session_headers,
)
from tests.factories import RsaKeys
from tests.upstreams import Recorder, free_port

pytestmark = pytest.mark.e2e

LIST_TOOLS = {"jsonrpc": "2.0", "id": 5, "method": "tools/list", "params": {}}
SPOKEN = ["2025-03-26", "2025-06-18", "2025-11-25", "2026-07-28"]  # what the proxy says it speaks


# --- F7 in the handshake era: a session request in a version the proxy does not speak -----------


@pytest.mark.parametrize("version", ["1999-01-01", "2026-07-28", "2025-11-26", "latest"])
async def test_a_session_request_in_an_unsupported_version_is_400_with_the_supported_list(
    proxy: RunningProxy, upstreams: dict[str, Any], version: str
) -> None:
    token = proxy.token("acme")
    session_id = await initialize(proxy, token)
    before = {tenant: len(upstreams[tenant].recorder.snapshot()) for tenant in TENANTS}
    status, headers, body = await proxy.post(
        LIST_TOOLS, token=token, headers={**session_headers(session_id), "MCP-Protocol-Version": version}
    )
    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    answer = json.loads(body)
    assert answer == {
        "jsonrpc": "2.0",
        "id": 5,
        "error": {
            "code": -32022,
            "message": "Unsupported protocol version for a session",
            "data": {"supported": SPOKEN, "requested": version},
        },
    }
    assert {tenant: len(upstreams[tenant].recorder.snapshot()) for tenant in TENANTS} == before
    # The session itself is untouched: in its own version it is served.
    status, _, body = await proxy.post(LIST_TOOLS, token=token, headers=session_headers(session_id))
    assert status == 200
    assert "whoami" in body.decode()


async def test_an_initialize_proposing_an_unknown_version_gets_the_version_the_upstream_chose(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    """The handshake negotiates: the upstream answers with a version it speaks, and the session
    then speaks that version (the proxy refuses the proposal nowhere, and never keeps it)."""
    token = proxy.token("acme")
    body = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": "1999-01-01",
            "capabilities": {},
            "clientInfo": {"name": "old-client", "version": "0"},
        },
    }
    status, headers, raw = await proxy.post(body, token=token)
    assert status == 200
    chosen = json.loads(raw)["result"]["protocolVersion"]
    assert chosen in HANDSHAKE_VERSIONS
    session_id = headers["Mcp-Session-Id"]
    status, _, _ = await proxy.post(
        LIST_TOOLS, token=token, headers={"Mcp-Session-Id": session_id, "MCP-Protocol-Version": chosen}
    )
    assert status == 200
    status, _, raw = await proxy.post(
        LIST_TOOLS, token=token, headers={"Mcp-Session-Id": session_id, "MCP-Protocol-Version": "1999-01-01"}
    )
    assert (status, error_of(raw)["code"]) == (400, -32022)
    (listed,) = [r for r in upstreams["acme"].recorder.snapshot() if '"tools/list"' in r.text]
    assert listed.headers["mcp-protocol-version"] == chosen


# --- a proxy process of its own ------------------------------------------------------------------

# What the flood tool did, by tag (it runs on the upstream thread).
FLOOD_EVENTS: dict[str, list[str]] = {}
FLOOD_EVENT_BYTES = 64 * 1024
FLOOD_EVENTS_PER_CALL = 2000  # 128 MB of progress: more than every buffer between tool and client


def flood_server() -> MCPServer:
    server = MCPServer("flood")

    @server.tool()
    async def flood(tag: str, n: int, size: int, ctx: Context) -> dict[str, Any]:
        """Sends n progress notifications of `size` bytes as fast as they can go, then answers."""
        events = FLOOD_EVENTS.setdefault(tag, [])
        events.append("started")
        filler = "x" * size
        try:
            for step in range(n):
                await ctx.report_progress(step + 1, n, filler)
                if step % 100 == 99:
                    events.append(f"sent {step + 1}")
        except anyio.get_cancelled_exc_class():
            events.append("cancelled")
            raise
        events.append("finished")
        return {"done": n}

    return server


@pytest.fixture(scope="module")
def flood_upstream(upstream_runner: Any) -> str:
    recorder = Recorder(flood_server().streamable_http_app(host="127.0.0.1"))
    port = free_port()
    upstream_runner.serve(recorder, port)
    return f"http://127.0.0.1:{port}/mcp"


MAX_BODY_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def proxy_process(
    tmp_path_factory: pytest.TempPathFactory,
    upstream_servers: dict[str, Any],
    flood_upstream: str,
    rsa_keys: RsaKeys,
) -> Iterator[ProxyProcess]:
    """acme and globex on their notes servers, `streams` on the flood server; tight listen limits."""
    process = write_proxy_config(
        tmp_path_factory.mktemp("proxy-process"),
        {**upstream_servers, "streams": flood_upstream},
        rsa_keys,
        listen={
            "max_body_bytes": MAX_BODY_BYTES,
            "idle_timeout_seconds": 1.0,
            "body_timeout_seconds": 1.0,
        },
    )
    process.start(log_level="warning")
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def separate(proxy_process: ProxyProcess, upstream_servers: dict[str, Any]) -> ProxyProcess:
    for upstream in upstream_servers.values():
        upstream.recorder.clear()
    return proxy_process


class RssSampler:
    """The proxy process's VmRSS, sampled every 10 ms while active; `peak` is the highest seen."""

    def __init__(self, process: ProxyProcess) -> None:
        self.process = process
        self.peak = 0
        self.task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.process.rss_kb())
            await asyncio.sleep(0.01)

    @contextlib.asynccontextmanager
    async def active(self) -> AsyncIterator[RssSampler]:
        self.peak = self.process.rss_kb()
        self.task = asyncio.create_task(self._sample())
        try:
            yield self
        finally:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.peak = max(self.peak, self.process.rss_kb())


async def settled_rss(process: ProxyProcess) -> int:
    """VmRSS once it stops moving (freed memory returned, background work done)."""
    previous = process.rss_kb()
    for _ in range(20):
        await asyncio.sleep(0.1)
        now = process.rss_kb()
        if abs(now - previous) < 256:
            return now
        previous = now
    return previous


def head(token: str, extra: str) -> bytes:
    return (
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\nAccept: application/json, text/event-stream\r\n"
        f"Content-Type: application/json\r\n{extra}\r\n"
    ).encode()


async def read_answer(reader: asyncio.StreamReader, timeout: float) -> tuple[int, Any]:
    """(status, JSON body) of the one answer on a connection, or (0, None) if it closed without one."""
    try:
        async with asyncio.timeout(timeout):
            raw_head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in raw_head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            body = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return 0, None
    return int(raw_head.split(b" ", 2)[1]), json.loads(body)


async def push(writer: asyncio.StreamWriter, pieces: Iterator[bytes]) -> int:
    """Write pieces until they run out or the proxy stops taking them; returns the bytes written."""
    sent = 0
    with contextlib.suppress(ConnectionError):
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            sent += len(piece)
    return sent


async def answer_while_pushing(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pieces: Iterator[bytes]
) -> tuple[int, Any]:
    """The proxy's answer, read while the body is pushed; the pushing stops once it has come."""
    async with asyncio.TaskGroup() as group:
        pusher = group.create_task(push(writer, pieces))
        status, answer = await read_answer(reader, 10)
        pusher.cancel()
    return status, answer


TEN_MB = 10_000_000
PIECE = b"a" * 65536


async def declared_ten_mb(process: ProxyProcess, token: str) -> tuple[int, Any, float]:
    """Content-Length: 10 MB, and the body pushed as fast as the proxy takes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", process.port)
    started = time.monotonic()
    writer.write(head(token, f"Content-Length: {TEN_MB}\r\n"))
    status, answer = await answer_while_pushing(reader, writer, (PIECE for _ in range(TEN_MB // len(PIECE))))
    writer.close()
    return status, answer, time.monotonic() - started


async def chunked_ten_mb(process: ProxyProcess, token: str) -> tuple[int, Any, float]:
    """No declared length: 10 MB in 64 KiB chunks, pushed as fast as the proxy takes them."""
    reader, writer = await asyncio.open_connection("127.0.0.1", process.port)
    started = time.monotonic()
    writer.write(head(token, "Transfer-Encoding: chunked\r\n"))
    chunk = b"10000\r\n" + PIECE + b"\r\n"
    status, answer = await answer_while_pushing(reader, writer, (chunk for _ in range(TEN_MB // len(PIECE))))
    writer.close()
    return status, answer, time.monotonic() - started


async def slow_body(process: ProxyProcess, token: str) -> tuple[int, Any, float]:
    """A body within the limit that stops arriving halfway."""
    reader, writer = await asyncio.open_connection("127.0.0.1", process.port)
    started = time.monotonic()
    writer.write(head(token, f"Content-Length: {MAX_BODY_BYTES - 1024}\r\n") + b"a" * 30_000)
    status, answer = await read_answer(reader, 10)
    writer.close()
    return status, answer, time.monotonic() - started


async def slowloris(process: ProxyProcess, token: str) -> tuple[int, Any, float]:
    """Headers that never end: one more line every 0.2 s until the proxy hangs up (or 6 s).
    Returns the status of whatever the proxy answered before hanging up (0: nothing), the bytes
    it sent, and when it hung up (-1: it never did)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", process.port)
    started = time.monotonic()
    received = b""
    closed_at = -1.0
    try:
        writer.write(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for index in range(30):
            writer.write(f"X-Slow-{index}: {'b' * 500}\r\n".encode())
            await writer.drain()
            try:
                chunk = await asyncio.wait_for(reader.read(65536), 0.2)
            except TimeoutError:
                continue
            received += chunk
            if not chunk:
                closed_at = time.monotonic() - started
                break
    except ConnectionError:
        closed_at = time.monotonic() - started
    finally:
        writer.close()
    status = int(received.split(b" ", 2)[1]) if received.startswith(b"HTTP/1.1 ") else 0
    return status, received, closed_at


ATTACKS = {"declared-10MB": declared_ten_mb, "chunked-10MB": chunked_ten_mb,
           "slow-body": slow_body, "slowloris": slowloris}  # fmt: skip
CONNECTIONS_PER_ATTACK = 50
# How much the proxy's resident memory may grow while it refuses the 200 connections at once.
# A proxy that buffered what it is sent would need 100 x 10 MB = 1 GB for the two pushing kinds.
# One that bounds each connection still holds, until its refusal closes the socket, what aiohttp
# reads before it pauses the socket: up to 2 x 64 KiB in the payload buffer plus one read of up to
# 256 KiB from the event loop (uvloop's read buffer), and a copy of that read on its way through
# the HTTP parser: about 640 KiB per pushing connection, 100 x 640 KiB = 62.5 MiB at worst (slow
# bodies hold < 64 KiB each, slow headers < max_header_bytes). Measured on this VM: 26-39 MB alone,
# up to 80 MB while other work loads the machine (allocator slack, more connections in progress).
# The bound sits well clear of that and four times below buffering: 256 MiB fails any proxy that
# keeps more than about 2.5 MiB (a quarter of a body) per pushing connection.
MAX_RSS_GROWTH_KB = 256 * 1024


async def test_two_hundred_oversized_and_slow_connections_leave_memory_bounded(
    separate: ProxyProcess, upstream_servers: dict[str, Any]
) -> None:
    client = separate.client
    token = client.token("acme")
    # Warm-up: one round of every attack, so first-use allocations are not counted as growth.
    await asyncio.gather(*(attack(separate, token) for attack in ATTACKS.values() for _ in range(5)))
    baseline = await settled_rss(separate)
    sampler = RssSampler(separate)
    async with sampler.active():
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(attack(separate, token) for attack in ATTACKS.values() for _ in range(CONNECTIONS_PER_ATTACK))
        )
        elapsed = time.monotonic() - started
    growth = sampler.peak - baseline
    by_attack = {
        name: outcomes[index * CONNECTIONS_PER_ATTACK : (index + 1) * CONNECTIONS_PER_ATTACK]
        for index, name in enumerate(ATTACKS)
    }
    too_large = {
        "code": -32600,
        "message": f"Request body too large: the limit is {MAX_BODY_BYTES} bytes",
    }
    for name in ("declared-10MB", "chunked-10MB"):
        for status, answer, _ in by_attack[name]:
            assert (status, answer) == (413, {"jsonrpc": "2.0", "id": None, "error": too_large}), name
    for status, answer, seconds in by_attack["slow-body"]:
        assert status == 408
        assert answer["error"] == {
            "code": -32600,
            "message": "Request timeout: the request body did not arrive in time",
        }
        assert seconds < 4.5
    for status, received, closed_after in by_attack["slowloris"]:
        # Never a complete request, so nothing to answer: the connection is closed, silently.
        assert (status, received) == (0, b"")
        assert 0 <= closed_after < 4.0, "a slowloris connection was still open after 6 s"
    assert elapsed < 15
    assert growth < MAX_RSS_GROWTH_KB, f"RSS grew by {growth} kB (baseline {baseline} kB)"
    assert all(not upstream.recorder.snapshot() for upstream in upstream_servers.values())
    # ... and the proxy still serves.
    status, _, body = await client.post(
        call_body("whoami", {}), token=client.token("globex"), headers=modern_headers("tools/call", "whoami")
    )
    assert status == 200
    assert upstream_servers["globex"].canary in body.decode()


def slow_socket() -> socket.socket:
    """A client socket with a tiny receive buffer, so that not reading fills it at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    return sock


async def whoami_latency(client: RunningProxy, tenant: str) -> float:
    began = time.perf_counter()
    status, _, _ = await client.post(
        call_body("whoami", {}), token=client.token(tenant), headers=modern_headers("tools/call", "whoami")
    )
    assert status == 200
    return time.perf_counter() - began


async def wait_for_event(tag: str, event: str, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while event not in FLOOD_EVENTS.get(tag, []) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return FLOOD_EVENTS.get(tag, [])


def flood_request(client: RunningProxy, tag: str, n: int) -> bytes:
    body = call_body("flood", {"tag": tag, "n": n, "size": FLOOD_EVENT_BYTES})
    body["params"]["_meta"]["progressToken"] = "flood"
    payload = json.dumps(body).encode()
    headers = "".join(f"{k}: {v}\r\n" for k, v in modern_headers("tools/call", "flood").items())
    extra = f"{headers}Connection: close\r\nContent-Length: {len(payload)}\r\n"
    return head(client.token("streams"), extra) + payload


async def test_control_a_reader_that_keeps_up_gets_the_whole_flood(separate: ProxyProcess) -> None:
    """What the slow reader's test compares with: read at full speed, the same tool sends all of a
    12.8 MB flood and finishes within a few seconds."""
    tag = secrets.token_hex(6)
    reader, writer = await asyncio.open_connection("127.0.0.1", separate.port)
    try:
        writer.write(flood_request(separate.client, tag, 200))
        async with asyncio.timeout(20):
            data = await reader.read()  # Connection: close: the proxy closes after the answer
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 200 ")
    assert data.count(b'"method":"notifications/progress"') == 200
    assert b'"structuredContent":{"done":200}' in data
    assert FLOOD_EVENTS[tag][-1] == "finished"


async def test_a_slow_reader_holds_back_only_its_own_stream_and_leaving_cancels_the_call(
    separate: ProxyProcess, upstream_servers: dict[str, Any]
) -> None:
    client = separate.client
    loop = asyncio.get_running_loop()
    baseline_latency = max([await whoami_latency(client, "globex") for _ in range(3)])
    baseline_rss = await settled_rss(separate)
    tag = secrets.token_hex(6)
    request = flood_request(client, tag, FLOOD_EVENTS_PER_CALL)
    sock = slow_socket()
    received = b""
    latencies: list[float] = []
    sampler = RssSampler(separate)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", separate.port))
        await loop.sock_sendall(sock, request)
        async with sampler.active():
            # The slow reader: 1 KiB every 100 ms (10 KiB/s against 128 MB on offer), for 3 s;
            # meanwhile globex's calls keep their usual latency.
            async def read_slowly() -> None:
                nonlocal received
                for _ in range(30):
                    received += await asyncio.wait_for(loop.sock_recv(sock, 1024), 5)
                    await asyncio.sleep(0.1)

            reading = asyncio.create_task(read_slowly())
            while not reading.done():
                latencies.append(await whoami_latency(client, "globex"))
                await asyncio.sleep(0.1)
            await reading
            events = list(FLOOD_EVENTS.get(tag, []))
    finally:
        sock.close()  # the slow reader goes away mid-stream
    assert received.startswith(b"HTTP/1.1 200 ")
    assert b"text/event-stream" in received.split(b"\r\n\r\n")[0]
    assert b'"method":"notifications/progress"' in received
    # Backpressure: after 3 s the tool has not been able to send everything (it would have in well
    # under a second had the proxy read the stream regardless of its client).
    assert "started" in events
    assert "finished" not in events
    # The other tenant was served at its usual speed throughout.
    assert len(latencies) >= 10
    assert max(latencies) < max(0.5, 10 * baseline_latency), latencies
    # What the proxy held for the slow reader stayed bounded (128 MB were on offer).
    growth = sampler.peak - baseline_rss
    assert growth < 32 * 1024, f"RSS grew by {growth} kB while the client read slowly"
    # Once the reader has gone, the upstream call is cancelled, not run to its end.
    final = await wait_for_event(tag, "cancelled", 5)
    assert "cancelled" in final, final
    assert "finished" not in final
    assert not upstream_servers["acme"].recorder.snapshot()
