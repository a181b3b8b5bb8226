"""A tenant's upstream misbehaving: each fault is that call's error, never a leak, never a neighbour's.

Tenant acme points at a small aiohttp app started here, scripted to fail in one way; tenant globex
keeps its real SDK upstream, to show that one tenant's fault does not touch another.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.protocol.errors import UpstreamError, UpstreamTimeout
from tests.conftest import MCP_ACCEPT, RunningProxy
from tests.e2e.test_transport_e2e import call_body, error_of, modern_headers, proxy_variant, sse_messages
from tests.factories import HANDSHAKE_INITIALIZE
from tests.upstreams import free_port, is_era_probe

pytestmark = pytest.mark.e2e

TRACE_MARKER = "Traceback (most recent call last): /srv/app.py"

# The proxy's own codes for "the upstream failed" and "the upstream timed out" (502 and 504).
UPSTREAM_FAILED = UpstreamError.code
UPSTREAM_TIMEOUT = UpstreamTimeout.code

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
WHOAMI_HEADERS = modern_headers("tools/call", "whoami")


@dataclass
class FakeUpstream:
    """A scripted upstream on loopback that records what reached it."""

    port: int
    received: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    probes: int = 0  # the proxy's own server/discover (upstreams/eras.py), kept out of `received`

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"


@dataclass
class Faults:
    """Starts fake upstreams and a proxy whose tenant acme uses one of them."""

    base: RunningProxy
    real_upstreams: dict[str, Any]
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def upstream(self, handler: Handler) -> FakeUpstream:
        fake = FakeUpstream(free_port())

        async def recording(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            if is_era_probe(body):
                fake.probes += 1
            else:
                fake.received.append((request.method, dict(request.headers), body))
            return await handler(request)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", recording)
        runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await runner.setup()
        self.stack.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, "127.0.0.1", fake.port).start()
        return fake

    async def proxy(self, acme_url: str, **acme_upstream: Any) -> RunningProxy:
        """A proxy whose tenant acme uses `acme_url`; globex keeps its real upstream."""
        changes = {"acme": {"url": acme_url, **acme_upstream}}
        return await self.stack.enter_async_context(proxy_variant(self.base, upstreams=changes))

    async def hang(self) -> None:
        """What a hung upstream does: wait until the test is over."""
        await self.release.wait()

    async def close(self) -> None:
        self.release.set()
        await self.stack.aclose()


@pytest.fixture
async def faults(proxy: RunningProxy, upstreams: dict[str, Any]) -> AsyncIterator[Faults]:
    harness = Faults(proxy, upstreams)
    try:
        yield harness
    finally:
        await harness.close()


async def proxy_with(faults: Faults, handler: Handler, **options: Any) -> tuple[RunningProxy, FakeUpstream]:
    fake = await faults.upstream(handler)
    return await faults.proxy(fake.url, **options), fake


async def call_whoami(proxy: RunningProxy, tenant: str = "acme") -> tuple[int, dict[str, str], bytes]:
    return await proxy.post(call_body("whoami", {}), token=proxy.token(tenant), headers=WHOAMI_HEADERS)


def json_reply(message: Any, status: int = 200, content_type: str = "application/json") -> web.Response:
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    return web.Response(status=status, body=body, content_type=content_type)


def assert_no_internals(body: bytes, *secrets: str) -> None:
    text = body.decode("utf-8", "replace")
    for marker in ("Traceback", "refused", "Errno", "127.0.0.1", "localhost", "/srv/", *secrets):
        assert marker not in text, f"{marker!r} leaked: {text}"


async def assert_globex_unaffected(proxy: RunningProxy, real_upstreams: dict[str, Any]) -> None:
    status, _, body = await call_whoami(proxy, "globex")
    assert status == 200
    assert real_upstreams["globex"].canary in body.decode()


# --- connection-level faults ---------------------------------------------------------------------


async def test_an_unreachable_upstream_is_502_without_internals(
    faults: Faults, upstreams: dict[str, Any]
) -> None:
    port = free_port()  # nothing listens here
    proxy = await faults.proxy(f"http://127.0.0.1:{port}/mcp", connect_timeout_seconds=2)
    status, headers, body = await call_whoami(proxy)
    assert status == 502
    assert headers["Content-Type"].startswith("application/json")
    error = error_of(body)
    assert error["code"] == UPSTREAM_FAILED
    assert json.loads(body)["id"] == 1
    assert_no_internals(body, str(port), "Connect")
    await assert_globex_unaffected(proxy, upstreams)


async def answer_nothing(request: web.Request) -> web.StreamResponse:
    return json_reply({"jsonrpc": "2.0", "id": 1, "result": {"content": []}})


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
async def test_a_redirect_is_502_and_never_followed(faults: Faults, code: int) -> None:
    elsewhere = await faults.upstream(answer_nothing)

    async def redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(status=code, headers={"Location": f"http://localhost:{elsewhere.port}/mcp"})

    proxy, fake = await proxy_with(faults, redirect)
    status, _, body = await call_whoami(proxy)
    assert status == 502
    error = error_of(body)
    assert error["code"] == UPSTREAM_FAILED
    assert "redirect" in error["message"]
    assert_no_internals(body, str(elsewhere.port))
    assert len(fake.received) == 1
    assert elsewhere.received == []


async def test_an_upstream_that_resets_mid_response_is_502(faults: Faults, upstreams: dict[str, Any]) -> None:
    async def reset(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "500"})
        await response.prepare(request)
        await response.write(b'{"jsonrpc": "2.0", "id": 1, "res')
        assert request.transport is not None
        request.transport.close()
        return response

    proxy, _ = await proxy_with(faults, reset)
    status, _, body = await call_whoami(proxy)
    assert status == 502
    assert error_of(body)["code"] == UPSTREAM_FAILED
    assert_no_internals(body)
    await assert_globex_unaffected(proxy, upstreams)


async def test_a_hung_upstream_is_504_after_the_read_timeout(
    faults: Faults, upstreams: dict[str, Any]
) -> None:
    async def hang(request: web.Request) -> web.StreamResponse:
        await faults.hang()
        return web.Response(status=204)

    proxy, _ = await proxy_with(faults, hang, read_timeout_seconds=0.5)
    started = asyncio.get_running_loop().time()
    status, _, body = await call_whoami(proxy)
    elapsed = asyncio.get_running_loop().time() - started
    assert status == 504
    assert error_of(body)["code"] == UPSTREAM_TIMEOUT
    assert 0.4 <= elapsed < 3
    # Meanwhile the other tenant is served at its usual speed.
    await assert_globex_unaffected(proxy, upstreams)


async def test_an_upstream_that_stalls_mid_body_is_504(faults: Faults) -> None:
    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "500"})
        await response.prepare(request)
        await response.write(b'{"jsonrpc": "2.0", "id": 1, ')
        await faults.hang()
        return response

    proxy, _ = await proxy_with(faults, stall, read_timeout_seconds=0.5)
    status, _, body = await call_whoami(proxy)
    assert (status, error_of(body)["code"]) == (504, UPSTREAM_TIMEOUT)


# --- answers that are not usable ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "content_type", "body", "expected_status"),
    [
        (200, "application/json", b"this is not json {", 502),
        (200, "application/json", b"[1, 2, 3]", 502),
        (200, "application/json", b'"just a string"', 502),
        (200, "application/json", b'{"jsonrpc": "2.0", "id": 1, "result": {}}\xff', 502),
        (200, "text/html", b"<html>Welcome to nginx!</html>", 502),
        (500, "text/html", b"<pre>Traceback (most recent call last): File /srv/app.py</pre>", 502),
        (502, "application/json", b'{"detail": "Traceback (most recent call last): /srv/app.py"}', 502),
        (200, "application/octet-stream", b"\x00\x01\x02", 502),
        (200, "application/json", b'{"jsonrpc": "2.0", "id": 1, "result": {"x": 1e400}}', 502),
        # Well-formed JSON-RPC for this id whose result is unusable: an in-band internal error.
        (200, "application/json", b'{"jsonrpc": "2.0", "id": 1, "result": "not an object"}', 200),
    ],
    ids=[
        "not-json",
        "array",
        "string",
        "trailing-garbage",
        "html-200",
        "html-500",
        "json-without-error-502",
        "binary",
        "float-overflow",
        "result-not-object",
    ],
)
async def test_garbage_from_the_upstream_is_a_generic_error(
    faults: Faults, status: int, content_type: str, body: bytes, expected_status: int
) -> None:
    async def garbage(request: web.Request) -> web.StreamResponse:
        return json_reply(body, status=status, content_type=content_type)

    proxy, _ = await proxy_with(faults, garbage)
    client_status, headers, answer = await call_whoami(proxy)
    assert client_status == expected_status
    assert headers["Content-Type"].startswith("application/json")
    error = error_of(answer)
    assert error["code"] == (UPSTREAM_FAILED if expected_status == 502 else -32603)
    assert json.loads(answer)["id"] == 1
    assert_no_internals(answer, "nginx")


async def test_an_upstream_answer_with_duplicate_keys_reaches_the_client_normalised(faults: Faults) -> None:
    """Answers are parsed fast (no duplicate check) but never passed on as sent: the client gets the
    proxy's own serialisation of what the proxy read, so no two parsers can disagree about it."""

    async def duplicated(request: web.Request) -> web.StreamResponse:
        return json_reply(b'{"jsonrpc": "2.0", "id": 1, "result": {"v": "first", "v": "second"}}')

    proxy, _ = await proxy_with(faults, duplicated)
    status, _, answer = await call_whoami(proxy)
    assert status == 200
    assert answer.count(b'"v"') == 1
    assert json.loads(answer)["result"] == {"v": "second"}


async def test_an_upstream_answer_with_an_unconvertible_integer_is_502(faults: Faults) -> None:
    async def huge_number(request: web.Request) -> web.StreamResponse:
        body = b'{"jsonrpc": "2.0", "id": 1, "result": {"n": ' + b"9" * 5000 + b"}}"
        return json_reply(body)

    proxy, _ = await proxy_with(faults, huge_number)
    status, _, body = await call_whoami(proxy)
    assert (status, error_of(body)["code"]) == (502, UPSTREAM_FAILED)


TRACE = (
    "Traceback (most recent call last):\n  File \"/srv/app.py\", line 12, in handler\nKeyError: 'db_password'"
)


@pytest.mark.parametrize("http_status", [200, 500])
async def test_an_internal_error_from_the_upstream_reaches_the_client_without_its_trace(
    faults: Faults, http_status: int
) -> None:
    async def internal_error(request: web.Request) -> web.StreamResponse:
        request_id = json.loads(await request.read())["id"]
        error = {"code": -32603, "message": TRACE, "data": {"traceback": TRACE, "host": "db.internal:5432"}}
        return json_reply({"jsonrpc": "2.0", "id": request_id, "error": error}, status=http_status)

    proxy, _ = await proxy_with(faults, internal_error)
    status, _, body = await call_whoami(proxy)
    assert status == http_status
    assert json.loads(body) == {
        "jsonrpc": "2.0",
        "id": 1,
        "error": {"code": -32603, "message": "Upstream server error"},
    }


@pytest.mark.parametrize("wrong_id", [999, "1", None, 1.0])
async def test_an_answer_with_the_wrong_id_is_502(faults: Faults, wrong_id: Any) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        return json_reply({"jsonrpc": "2.0", "id": wrong_id, "result": {"secret": "other-call"}})

    proxy, _ = await proxy_with(faults, answer)
    status, _, body = await call_whoami(proxy)
    assert status == 502
    assert error_of(body)["code"] == UPSTREAM_FAILED
    assert "other-call" not in body.decode()


@pytest.mark.parametrize(
    "listing",
    [
        json_reply(b"{not json"),
        json_reply(b'{"jsonrpc": "2.0", "id": "x", "result": {}, "result": {}}'),
        web.Response(body=b"data: {not json\n\n", content_type="text/event-stream"),
        json_reply({"jsonrpc": "2.0", "id": 1, "error": {"code": -32603, "message": TRACE_MARKER}}),
    ],
    ids=["not-json", "duplicate-keys", "sse-not-json", "error"],
)
async def test_an_unusable_tool_listing_is_an_upstream_error_not_the_clients(
    faults: Faults, listing: web.Response
) -> None:
    """A call with Mcp-Param-* headers makes the proxy list the tools first; that listing is garbage."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=listing.body, headers={"Content-Type": listing.content_type})

    proxy, fake = await proxy_with(faults, handler)
    body = call_body("region_report", {"region": "emea"})
    headers = modern_headers("tools/call", "region_report", **{"Mcp-Param-Region": "emea"})
    status, _, answer = await proxy.post(body, token=proxy.token("acme"), headers=headers)
    assert status == 502
    assert error_of(answer)["code"] == UPSTREAM_FAILED
    assert_no_internals(answer)
    methods = [json.loads(received[2]).get("method") for received in fake.received]
    assert methods == ["tools/list"]


# --- SSE answers ---------------------------------------------------------------------------------


def sse_event(message: Any) -> bytes:
    return f"event: message\ndata: {json.dumps(message)}\n\n".encode()


PROGRESS = {
    "jsonrpc": "2.0",
    "method": "notifications/progress",
    "params": {"progressToken": "p", "progress": 1},
}


def sse_upstream(*chunks: bytes, then: Callable[[], Awaitable[None]] | None = None) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in chunks:
            await response.write(chunk)
        if then is not None:
            await then()
        await response.write_eof()
        return response

    return handler


async def read_stream(proxy: RunningProxy) -> list[dict[str, Any]]:
    headers = {
        "Authorization": f"Bearer {proxy.token('acme')}",
        "Accept": MCP_ACCEPT,
        "Content-Type": "application/json",
        **WHOAMI_HEADERS,
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(proxy.url, data=json.dumps(call_body("whoami", {})), headers=headers) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        return [message async for message in sse_messages(response)]


async def test_an_sse_stream_that_ends_without_an_answer_gives_an_error_event(
    faults: Faults, upstreams: dict[str, Any]
) -> None:
    proxy, _ = await proxy_with(faults, sse_upstream(sse_event(PROGRESS)))
    messages = await read_stream(proxy)
    assert messages[0] == PROGRESS
    assert len(messages) == 2
    assert messages[1]["id"] == 1
    assert messages[1]["error"]["code"] == UPSTREAM_FAILED
    assert "without answering" in messages[1]["error"]["message"]
    await assert_globex_unaffected(proxy, upstreams)


async def test_an_empty_sse_stream_gives_an_error_event(faults: Faults) -> None:
    proxy, _ = await proxy_with(faults, sse_upstream())
    messages = await read_stream(proxy)
    assert [m["error"]["code"] for m in messages] == [UPSTREAM_FAILED]


async def test_a_malformed_sse_event_gives_an_error_event(faults: Faults) -> None:
    proxy, _ = await proxy_with(faults, sse_upstream(sse_event(PROGRESS), b"data: {not json\n\n"))
    messages = await read_stream(proxy)
    assert messages[0] == PROGRESS
    assert messages[-1]["id"] == 1
    assert messages[-1]["error"]["code"] == UPSTREAM_FAILED
    assert "malformed" in messages[-1]["error"]["message"]
    assert len(messages) == 2


async def test_sse_answers_for_other_ids_are_dropped_and_the_stream_errors(faults: Faults) -> None:
    stray = {"jsonrpc": "2.0", "id": 77, "result": {"secret": "someone-else"}}
    proxy, _ = await proxy_with(faults, sse_upstream(sse_event(stray)))
    messages = await read_stream(proxy)
    assert "someone-else" not in json.dumps(messages)
    assert [m["error"]["code"] for m in messages] == [UPSTREAM_FAILED]


async def test_an_internal_error_on_an_sse_stream_is_sanitized(faults: Faults) -> None:
    error = {"code": -32603, "message": TRACE, "data": TRACE}
    proxy, _ = await proxy_with(faults, sse_upstream(sse_event({"jsonrpc": "2.0", "id": 1, "error": error})))
    messages = await read_stream(proxy)
    assert messages == [
        {"jsonrpc": "2.0", "id": 1, "error": {"code": -32603, "message": "Upstream server error"}}
    ]


async def test_a_server_request_in_the_modern_era_is_not_delivered(faults: Faults) -> None:
    """2026-07-28 has no back channel: a server-to-client request on a POST stream is dropped."""
    sampling = {"jsonrpc": "2.0", "id": 5, "method": "sampling/createMessage", "params": {"messages": []}}
    answer = {"jsonrpc": "2.0", "id": 1, "result": {"content": [], "isError": False}}
    proxy, _ = await proxy_with(faults, sse_upstream(sse_event(sampling), sse_event(answer)))
    messages = await read_stream(proxy)
    assert messages == [answer]


async def test_a_stalled_sse_stream_gives_a_timeout_error_event(faults: Faults) -> None:
    proxy, _ = await proxy_with(
        faults, sse_upstream(sse_event(PROGRESS), then=faults.hang), read_timeout_seconds=0.5
    )
    messages = await read_stream(proxy)
    assert messages[0] == PROGRESS
    assert messages[-1]["error"]["code"] == UPSTREAM_TIMEOUT


# --- isolation of faults -------------------------------------------------------------------------


async def test_one_tenants_dead_upstream_does_not_affect_the_other(
    faults: Faults, upstreams: dict[str, Any]
) -> None:
    proxy = await faults.proxy(f"http://127.0.0.1:{free_port()}/mcp")
    results = await asyncio.gather(*(call_whoami(proxy, tenant) for tenant in ["acme", "globex"] * 5))
    for index, (status, _, body) in enumerate(results):
        if index % 2 == 0:
            assert (status, error_of(body)["code"]) == (502, UPSTREAM_FAILED)
        else:
            assert status == 200
            assert upstreams["globex"].canary in body.decode()
            assert upstreams["acme"].canary not in body.decode()
    assert not upstreams["acme"].recorder.snapshot()


async def test_a_hung_upstream_does_not_delay_the_other_tenant(
    faults: Faults, upstreams: dict[str, Any]
) -> None:
    async def hang(request: web.Request) -> web.StreamResponse:
        await faults.hang()
        return web.Response(status=204)

    proxy, fake = await proxy_with(faults, hang, read_timeout_seconds=5)
    stuck = asyncio.create_task(call_whoami(proxy, "acme"))
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(3):
            await assert_globex_unaffected(proxy, upstreams)
        assert loop.time() - started < 2
        assert not stuck.done()
        assert len(fake.received) + fake.probes == 1  # (the first request waits for the era probe)
    finally:
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck


# --- handshake-era initialize that fails ---------------------------------------------------------


def failing_initialize(kind: str) -> Handler:
    """An upstream that opens a session but never completes initialize successfully."""

    async def handler(request: web.Request) -> web.StreamResponse:
        session = {"Mcp-Session-Id": "upstream-session-1"}
        if kind == "garbage":
            return web.Response(body=b"{oops", content_type="application/json", headers=session)
        if kind == "error":
            error = {"code": -32602, "message": "Unsupported protocol version"}
            body = json.dumps({"jsonrpc": "2.0", "id": 0, "error": error}).encode()
            return web.Response(body=body, content_type="application/json", headers=session)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **session})
        await response.prepare(request)
        await response.write_eof()  # the stream ends without an answer
        return response

    return handler


@pytest.mark.parametrize(
    ("kind", "expected_status"),
    [
        ("garbage", 502),
        ("error", 200),
        ("sse-without-answer", 502),
    ],
)
async def test_a_failed_initialize_does_not_use_up_the_session_cap(
    faults: Faults, kind: str, expected_status: int
) -> None:
    fake = await faults.upstream(failing_initialize(kind))
    capped = proxy_variant(faults.base, upstreams={"acme": {"url": fake.url}}, sessions={"max_per_tenant": 1})
    proxy = await faults.stack.enter_async_context(capped)
    for _ in range(2):
        status, _, _ = await proxy.post(HANDSHAKE_INITIALIZE, token=proxy.token("acme"))
        assert status == expected_status  # the second is 429 when the first left a session behind
    methods = [method for method, _, _ in fake.received]
    assert methods.count("POST") == 2
    assert methods.count("DELETE") == 2  # the upstream's half-open session is ended too
