"""THREATS F at the socket: slow clients, oversized and contradictory framing, bad bytes.

Each case speaks raw HTTP/1.1 to the running proxy and asserts the status, that the body is a
JSON-RPC error, whether the connection was closed, that the proxy kept serving others, and that
no upstream saw anything.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from tests.conftest import RunningProxy, StartProxy

pytestmark = pytest.mark.e2e


async def exchange_raw(running: RunningProxy, raw: bytes, read_timeout: float = 5.0) -> tuple[int, Any, bool]:
    """Send raw bytes; return (status, JSON body or None, whether the server closed the connection)."""
    port = int(running.url.split(":")[2].split("/")[0])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), read_timeout)
        status = int(head.split(b" ", 2)[1])
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        body = await asyncio.wait_for(reader.readexactly(length), read_timeout) if length else b""
        closed = await asyncio.wait_for(reader.read(1), read_timeout) == b""
        return status, json.loads(body) if body else None, closed
    finally:
        writer.close()


def request(
    token: str, extra: str = "", body: bytes = b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}'
) -> bytes:
    head = (
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\nAccept: application/json, text/event-stream\r\n"
        f"Content-Type: application/json\r\n{extra}"
    )
    if "Content-Length" not in extra and "Transfer-Encoding" not in extra:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


@pytest.fixture
async def guarded(make_proxy: StartProxy, upstreams: dict[str, Any]) -> RunningProxy:
    return await make_proxy(
        upstreams,
        listen={"idle_timeout_seconds": 1.0, "body_timeout_seconds": 1.0, "max_body_bytes": 65536},
    )


def nothing_reached(upstreams: dict[str, Any]) -> bool:
    return not any(upstream.recorder.snapshot() for upstream in upstreams.values())


async def test_slow_headers_are_cut_off_while_normal_clients_keep_their_latency(
    guarded: RunningProxy, upstreams: dict[str, Any]
) -> None:
    port = int(guarded.url.split(":")[2].split("/")[0])
    slow = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
    for _, writer in slow:
        writer.write(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    started = time.monotonic()
    latencies = []
    closed_at: list[float] = []

    async def dribble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for index in range(40):  # one header line every 0.1 s: never a complete request
            try:
                writer.write(f"X-Slow-{index}: a\r\n".encode())
                await writer.drain()
            except ConnectionError:
                break
            if reader.at_eof():
                break
            await asyncio.sleep(0.1)
        closed_at.append(time.monotonic() - started)

    dribblers = [asyncio.create_task(dribble(r, w)) for r, w in slow]
    for _ in range(5):
        began = time.perf_counter()
        status, _, _ = await guarded.post({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, token="bad")
        latencies.append(time.perf_counter() - began)
        assert status == 401
        await asyncio.sleep(0.1)
    await asyncio.gather(*dribblers)
    for _, writer in slow:
        writer.close()
    assert max(closed_at) < 3.0  # idle_timeout_seconds: 1, well before the 4 s of dribbling
    assert max(latencies) < 0.5
    assert nothing_reached(upstreams)


async def test_a_slow_body_gets_408(guarded: RunningProxy, upstreams: dict[str, Any]) -> None:
    started = time.monotonic()
    status, body, _ = await exchange_raw(
        guarded, request(guarded.token(), "Content-Length: 100\r\n", b'{"jsonrpc"'), read_timeout=5
    )
    assert status == 408
    assert body["error"]["code"] == -32600
    assert time.monotonic() - started < 4.5  # 1 s body timeout, then at most 2 s lingering
    assert nothing_reached(upstreams)


@pytest.mark.parametrize(
    ("extra", "body", "status"),
    [
        ("X-Big: " + "a" * 65536 + "\r\n", b"{}", 431),
        ("".join(f"X-H{i}: v\r\n" for i in range(200)), b"{}", 400),
        ("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n", 400),
        ("Content-Length: 5\r\nContent-Length: 6\r\n", b"abcdef", 400),
        ("Transfer-Encoding: chunked\r\n", b"zz\r\nabc\r\n0\r\n\r\n", 400),
        ("Transfer-Encoding: chunked, gzip\r\n", b"0\r\n\r\n", 400),
    ],
    ids=[
        "64k-header",
        "too-many-headers",
        "cl-and-te",
        "two-lengths",
        "bad-chunk-size",
        "te-not-chunked-last",
    ],
)
async def test_malformed_framing_is_refused_and_the_connection_closed(
    guarded: RunningProxy, upstreams: dict[str, Any], extra: str, body: bytes, status: int
) -> None:
    got, answer, closed = await exchange_raw(guarded, request(guarded.token(), extra, body))
    assert got == status
    assert answer["jsonrpc"] == "2.0"
    assert answer["error"]["code"] == -32600
    assert "aaaa" not in json.dumps(answer)  # nothing of the input is echoed
    assert closed
    assert nothing_reached(upstreams)
    assert (await guarded.post({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, token="x"))[0] == 401


@pytest.mark.parametrize(
    ("extra", "body", "status", "code"),
    [
        ("Content-Length: 10000000\r\n", b"", 413, -32600),
        (
            "Transfer-Encoding: chunked\r\n",
            b"10000\r\n" + b"a" * 65536 + b"\r\n10000\r\n" + b"a" * 65536 + b"\r\n0\r\n\r\n",
            413,
            -32600,
        ),
        ("", b'{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"x":"\xff\xfe"}}', 400, -32700),
        ("Authorization: Bearer second\r\n", b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}', 400, -32600),
    ],
    ids=["declared-too-large", "chunked-too-large", "invalid-utf8", "two-authorization-headers"],
)
async def test_bodies_and_duplicates(
    guarded: RunningProxy, upstreams: dict[str, Any], extra: str, body: bytes, status: int, code: int
) -> None:
    got, answer, _ = await exchange_raw(guarded, request(guarded.token(), extra, body))
    assert got == status
    assert answer["error"]["code"] == code
    assert nothing_reached(upstreams)
