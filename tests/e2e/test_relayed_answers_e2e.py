"""Upstream answers relayed faithfully, both eras: a missing resource's `data.uri` (SEP-2164) reaches
the SDK client, and an upstream's 429 or 503 with Retry-After becomes the proxy's own Retry-After,
without opening the tenant's circuit on a 429 (a 503 counts as an upstream fault, as before)."""

from __future__ import annotations

import contextlib
import email.utils
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from mcp import MCPError

from proxy.demo import client_for
from tests.adversarial.test_i_circuit import breaker
from tests.conftest import RunningProxy, StartProxy
from tests.e2e.test_transport_e2e import HANDSHAKE, call_body, error_of, modern_headers
from tests.factories import HANDSHAKE_INITIALIZE
from tests.upstreams import free_port

pytestmark = pytest.mark.e2e

UNUSED = "http://unused.invalid/mcp"


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_a_missing_resources_uri_reaches_the_sdk_client(proxy: RunningProxy, mode: str) -> None:
    uri = "missing://acme/nothing-here"
    async with client_for(proxy.url, proxy.token("acme"), mode) as client:
        with pytest.raises(MCPError) as missing:
            await client.read_resource(uri)
    assert missing.value.error.code == -32602
    assert missing.value.error.data == {"uri": uri}
    assert uri in missing.value.error.message


# --- an upstream that asks to wait ------------------------------------------------------------------

Answer = Callable[[dict[str, Any]], web.Response]


def initialized(message: dict[str, Any]) -> web.Response:
    """initialize answered (with a session), notifications accepted; everything else refused by `busy`."""
    result = {"protocolVersion": HANDSHAKE, "capabilities": {"tools": {}}, "serverInfo": {"name": "busy"}}
    body = {"jsonrpc": "2.0", "id": message.get("id"), "result": result}
    return web.json_response(body, headers={"Mcp-Session-Id": "upstream-session-1"})


def refusing(status: int, retry_after: str | None, json_body: bool = True) -> Answer:
    """Every request but the handshake refused with `status`, `Retry-After: retry_after` and a body
    (a JSON-RPC error carrying internals the client must not see, or plain text)."""

    def answer(message: dict[str, Any]) -> web.Response:
        if message.get("method") == "initialize":
            return initialized(message)
        if "id" not in message:
            return web.Response(status=202)
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        if not json_body:
            return web.Response(status=status, text="Slow down", headers=headers)
        error = {"code": -32000, "message": "rate limited by /srv/limits.py:12 for host db-7"}
        body = {"jsonrpc": "2.0", "id": message.get("id"), "error": error}
        return web.json_response(body, status=status, headers=headers)

    return answer


@contextlib.asynccontextmanager
async def upstream_answering(answer: Answer) -> AsyncIterator[str]:
    async def handle(request: web.Request) -> web.Response:
        return answer(await request.json())

    async def busy_stream(request: web.Request) -> web.Response:
        return web.Response(status=429, text="Slow down", headers={"Retry-After": "7"})

    app = web.Application()
    app.router.add_post("/mcp", handle)
    app.router.add_get("/mcp", busy_stream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        await runner.cleanup()


async def modern_call(running: RunningProxy) -> tuple[int, dict[str, str], bytes]:
    return await running.post(
        call_body("whoami", {}), token=running.token(), headers=modern_headers("tools/call", "whoami")
    )


async def handshake_session(running: RunningProxy) -> dict[str, str]:
    status, headers, _ = await running.post(HANDSHAKE_INITIALIZE, token=running.token())
    assert status == 200, status
    return {"Mcp-Session-Id": headers["Mcp-Session-Id"], "MCP-Protocol-Version": HANDSHAKE}


async def handshake_call(running: RunningProxy) -> tuple[int, dict[str, str], bytes]:
    session = await handshake_session(running)
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}}
    return await running.post(body, token=running.token(), headers=session)


async def handshake_stream(running: RunningProxy) -> tuple[int, dict[str, str], bytes]:
    """The session's GET stream, which the upstream refuses."""
    headers = {"Authorization": f"Bearer {running.token()}", "Accept": "text/event-stream"}
    headers |= await handshake_session(running)
    async with aiohttp.ClientSession() as http, http.get(running.url, headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


CALLS = {"modern": modern_call, "handshake": handshake_call, "handshake-get": handshake_stream}


@pytest.mark.parametrize(
    ("era", "json_body"),
    [
        pytest.param("modern", True, id="modern-json-rpc-body"),
        pytest.param("modern", False, id="modern-text-body"),
        pytest.param("handshake", True, id="handshake-json-rpc-body"),
        pytest.param("handshake", False, id="handshake-text-body"),
        pytest.param("handshake-get", False, id="handshake-get-stream"),
    ],
)
async def test_an_upstream_429_retry_after_becomes_the_proxys_own(
    make_proxy: StartProxy, era: str, json_body: bool
) -> None:
    async with upstream_answering(refusing(429, "7", json_body)) as url:
        running = await make_proxy({"acme": url, "globex": UNUSED})
        status, headers, body = await CALLS[era](running)
    assert status == 429
    assert headers["Retry-After"] == "7"
    error = error_of(body)
    assert error["code"] == -32009
    assert error["data"] == {"limit": "upstream", "retryAfterSeconds": 7}
    assert "upstream MCP server asked to wait 7 s" in error["message"]
    assert "srv" not in body.decode() and "db-7" not in body.decode()  # its own words stay out


async def test_an_upstream_503_with_an_http_date_is_bounded_and_still_an_upstream_fault(
    make_proxy: StartProxy,
) -> None:
    soon = email.utils.formatdate(time.time() + 120, usegmt=True)
    async with (
        upstream_answering(refusing(503, soon)) as dated,
        upstream_answering(refusing(503, "86400")) as far,
    ):
        running = await make_proxy({"acme": dated, "globex": far}, limits={"circuit_failures": 2})
        status, headers, body = await modern_call(running)
        assert status == 503
        assert 0 < int(headers["Retry-After"]) <= 120
        assert error_of(body)["data"]["retryAfterSeconds"] == int(headers["Retry-After"])
        assert error_of(body)["code"] == -32012
        status, headers, body = await running.post(
            call_body("whoami", {}),
            token=running.token("globex"),
            headers=modern_headers("tools/call", "whoami"),
        )
        assert (status, headers["Retry-After"]) == (503, "3600")  # a day asked for: an hour at most
        # A 503 is the upstream failing, as it was without the hint: the circuit opens after two.
        status, headers, body = await modern_call(running)
        assert status == 503 and error_of(body)["data"]["limit"] == "upstream"
        status, headers, body = await modern_call(running)
        assert status == 503 and error_of(body)["data"] == {"limit": "circuit"}
        assert breaker(running).breaker.is_open


@pytest.mark.parametrize("era", ["modern", "handshake"])
async def test_upstream_429s_never_open_the_circuit(make_proxy: StartProxy, era: str) -> None:
    async with upstream_answering(refusing(429, "7")) as url:
        running = await make_proxy({"acme": url, "globex": UNUSED}, limits={"circuit_failures": 2})
        statuses = [(await CALLS[era](running))[0] for _ in range(5)]
        assert statuses == [429] * 5
        assert breaker(running).breaker.failures == 0 and not breaker(running).breaker.is_open


@pytest.mark.parametrize("retry_after", [None, "soon", "-5", "7.5", ""])
async def test_a_429_without_a_usable_retry_after_is_relayed_as_before(
    make_proxy: StartProxy, retry_after: str | None
) -> None:
    async with upstream_answering(refusing(429, retry_after)) as url:
        running = await make_proxy({"acme": url, "globex": UNUSED})
        status, headers, body = await modern_call(running)
    assert status == 429 and "Retry-After" not in headers
    assert error_of(body) == {"code": -32000, "message": "Upstream server error"}
    assert json.loads(body)["id"] == 1


def failing_for(word: str) -> Answer:
    """The handshake answered; a tools/call whose arguments hold `word` answered with HTTP 500 (a
    tool that fails on some input), any other with a result."""

    def answer(message: dict[str, Any]) -> web.Response:
        if message.get("method") == "initialize":
            return initialized(message)
        if "id" not in message:
            return web.Response(status=202)
        if word in json.dumps(message.get("params", {}).get("arguments", {})):
            return web.Response(status=500, text="Internal Server Error")
        result = {"content": [{"type": "text", "text": "ok"}], "isError": False}
        return web.json_response({"jsonrpc": "2.0", "id": message.get("id"), "result": result})

    return answer


async def test_one_users_500s_never_shut_the_tenants_other_users_out(make_proxy: StartProxy) -> None:
    """A 500 may follow from the caller's own arguments: one user's calls failing so do not open the
    tenant's circuit; two users' do (the control)."""
    async with upstream_answering(failing_for("boom")) as url:
        running = await make_proxy({"acme": url, "globex": UNUSED}, limits={"circuit_failures": 2})

        async def session_of(sub: str) -> dict[str, str]:
            status, headers, _ = await running.post(HANDSHAKE_INITIALIZE, token=running.token(sub=sub))
            assert status == 200
            return {"Mcp-Session-Id": headers["Mcp-Session-Id"], "MCP-Protocol-Version": HANDSHAKE}

        async def call(sub: str, session: dict[str, str], argument: str) -> int:
            body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                    "params": {"name": "lookup", "arguments": {"q": argument}}}  # fmt: skip
            status, _, _ = await running.post(body, token=running.token(sub=sub), headers=session)
            return status

        mallory, bob = await session_of("mallory"), await session_of("bob")
        assert [await call("mallory", mallory, "boom") for _ in range(4)] == [502] * 4
        assert not breaker(running).breaker.is_open
        assert await call("bob", bob, "fine") == 200
        await call("mallory", mallory, "boom")
        assert await call("bob", bob, "boom") == 502  # a second user's call fails too
        assert breaker(running).breaker.is_open
