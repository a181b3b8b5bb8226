"""THREATS I: one tenant against all. Every bound is per tenant and checked before the work it
bounds: request structure before parsing, body bytes before reading, long-lived streams."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from proxy.protocol import structure
from proxy.protocol.errors import ParseError
from tests.conftest import MCP_ACCEPT, RunningProxy, StartProxy
from tests.e2e.test_transport_e2e import initialize, session_headers

pytestmark = pytest.mark.e2e

META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}
MODERN = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": "list_notes"}


def call_with(arguments: Any) -> bytes:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "list_notes", "arguments": arguments, "_meta": META},
    }
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("arguments", "what"),
    [
        ({f"k{i}": i for i in range(30_000)}, "members"),
        ({"l": [0] * 30_000}, "members"),
        ({"d": json.loads("[" * 100 + "]" * 100)}, "nested deeper"),
    ],
    ids=["keys", "elements", "depth"],
)
async def test_a_body_beyond_the_structural_bounds_is_refused_before_parsing(
    proxy: RunningProxy, upstreams: dict[str, Any], arguments: Any, what: str
) -> None:
    status, _, raw = await proxy.post(
        None, raw=call_with(arguments), token=proxy.token("acme"), headers=MODERN
    )
    assert status == 400
    error = json.loads(raw)["error"]
    assert error["code"] == -32700 and what in error["message"]
    assert not [r for r in upstreams["acme"].recorder.snapshot() if "tools/call" in r.text]
    fine = {f"k{i}": i for i in range(5_000)}  # within the bounds: served
    status, _, _ = await proxy.post(None, raw=call_with(fine), token=proxy.token("acme"), headers=MODERN)
    assert status == 200


def test_the_structure_check_stops_where_a_bound_is_crossed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cost of a refusal is proportional to what was accepted, not to the body's size: strings
    are cut out window by window, and the first window past the bound ends the check."""
    examined: list[int] = []
    real = structure._STRING

    class Counting:
        def sub(self, replacement: bytes, text: bytes) -> bytes:
            examined.append(len(text))
            return real.sub(replacement, text)

    monkeypatch.setattr(structure, "_STRING", Counting())
    huge = json.dumps({f"k{i}": "v" for i in range(300_000)}).encode()
    with pytest.raises(ParseError, match="more than 1000 members"):
        structure.check_structure(huge, max_members=1_000, max_depth=64)
    assert sum(examined) <= structure._WINDOW + 64  # one window of about 4 MB
    escaped = json.dumps({"s": 'a\\"b,:' * 100_000}).encode()  # separators inside one string
    structure.check_structure(escaped, max_members=1_000, max_depth=64)  # not members: accepted


@pytest.mark.parametrize("max_depth", [64, 100, 512])
def test_depth_is_judged_on_the_brackets_at_any_bound(max_depth: int) -> None:
    """Balanced groups nested up to the bound pass, one level more is refused, and so is a body of
    many wide groups whose one path goes one level too deep."""

    def nested(depth: int) -> bytes:
        return b"[" * depth + b"]" * depth

    wide = b"[" + b",".join([nested(max_depth - 1)] * 50) + b"]"
    assert structure.check_structure(wide, max_members=20_000, max_depth=max_depth) == 49
    assert structure.check_structure(nested(max_depth), 20_000, max_depth) == 0
    too_deep = b"[" + b",".join([nested(max_depth - 1)] * 49 + [nested(max_depth)]) + b"]"
    for body in (nested(max_depth + 1), too_deep, b'{"a":' + too_deep + b',"s":"[[[["}'):
        with pytest.raises(ParseError, match=f"nested deeper than {max_depth} levels"):
            structure.check_structure(body, max_members=20_000, max_depth=max_depth)
    strings = json.dumps({"s": "[" * (max_depth + 10)}).encode()  # brackets inside a string: not depth
    assert structure.check_structure(strings, 20_000, max_depth) == 1


def test_brackets_no_json_can_have_are_refused_before_any_depth_walk() -> None:
    """4 MB of `[][][]...` (no separators, millions of brackets) once took the token walk seconds:
    a value right after a closed one is no JSON, refused from the brackets alone."""
    for body in (b"[" + b"[]" * 2_000_000 + b"]", b'{"a":[1] {"b":2}}', b'[{}"x" {}]'):
        with pytest.raises(ParseError, match="without a comma"):
            structure.check_structure(body, max_members=20_000, max_depth=1)


async def test_request_bytes_in_flight_are_bounded_per_tenant(
    make_proxy: StartProxy, upstreams: dict[str, Any]
) -> None:
    running = await make_proxy(upstreams, limits={"max_bytes_in_flight": 4096})
    big = call_with({"note": "x" * 5000})
    status, headers, raw = await running.post(None, raw=big, token=running.token("acme"), headers=MODERN)
    assert status == 429
    assert json.loads(raw)["error"]["data"]["limit"] == "bytes"
    assert "Retry-After" in headers
    assert not [r for r in upstreams["acme"].recorder.snapshot() if "tools/call" in r.text]
    small = call_with({"note": "x" * 100})
    status, _, _ = await running.post(None, raw=small, token=running.token("acme"), headers=MODERN)
    assert status == 200


async def test_the_fifth_stream_under_max_streams_four_is_refused(
    make_proxy: StartProxy, upstreams: dict[str, Any]
) -> None:
    running = await make_proxy(upstreams, limits={"max_streams": 4})
    token = running.token("acme")
    sessions = [await initialize(running, token) for _ in range(6)]
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
    async with aiohttp.ClientSession() as http:
        opened = [
            await http.get(running.url, headers={**headers, **session_headers(s)}) for s in sessions[:4]
        ]
        try:
            assert [r.status for r in opened] == [200] * 4
            async with http.get(running.url, headers={**headers, **session_headers(sessions[4])}) as fifth:
                assert fifth.status == 429
                assert (await fifth.json())["error"]["data"]["limit"] == "streams"
                assert "Retry-After" in fifth.headers
            other = await http.get(
                running.url,
                headers={
                    "Authorization": f"Bearer {running.token('globex')}",
                    "Accept": MCP_ACCEPT,
                    **session_headers(await initialize(running, running.token("globex"))),
                },
            )
            assert other.status == 200  # another tenant's streams are its own
            other.close()
        finally:
            for response in opened:
                response.close()
        for _ in range(100):  # a closed stream gives its place back
            async with http.get(running.url, headers={**headers, **session_headers(sessions[5])}) as again:
                if again.status == 200:
                    break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the closed streams never gave their places back")


async def test_abandoned_handshake_calls_leave_only_a_summary_of_each_request(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    token = proxy.token("acme")
    session_id = await initialize(proxy, token)
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "Accept": MCP_ACCEPT,
        **session_headers(session_id),
    }
    pad = "p" * 200_000
    async with aiohttp.ClientSession() as http:
        for index in range(5):  # a slow tool, abandoned by the client while the upstream works on it
            body = {
                "jsonrpc": "2.0",
                "id": 100 + index,
                "method": "tools/call",
                "params": {"name": "countdown", "arguments": {"n": 50, "delay": 0.1, "pad": pad}},
            }
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(_post_and_read(http, proxy.url, body, headers), 0.3)
        for index in range(3):  # answered ones leave nothing
            body = {
                "jsonrpc": "2.0",
                "id": 200 + index,
                "method": "tools/call",
                "params": {"name": "whoami", "arguments": {}},
            }
            async with http.post(proxy.url, json=body, headers=headers) as response:
                assert response.status == 200
                await response.read()
    from proxy.http.keys import SERVICES

    session = proxy.app[SERVICES].sessions.all()[0]
    forwarded = list(session.forwarded.values())
    assert {message.id for message in forwarded} <= {100, 101, 102, 103, 104}  # no answered request
    assert all(len(json.dumps(message.body)) < 200 for message in forwarded)  # id, method, name: no body


async def _post_and_read(http: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str]) -> bytes:
    async with http.post(url, json=body, headers=headers) as response:
        return await response.read()
