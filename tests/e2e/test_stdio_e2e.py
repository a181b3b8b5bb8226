"""stdio upstreams end to end: real SDK stdio servers, one process per tenant (and per session)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import mcp_types as t
import pytest
from mcp import MCPError
from mcp.client.context import ClientRequestContext
from mcp_types import ElicitRequestParams, ElicitResult

from proxy.demo import client_for
from tests.conftest import TENANTS, RunningProxy, StartProxy
from tests.factories import DEV_SECRET, DEV_SECRET_ENV

pytestmark = pytest.mark.e2e

SERVER = str(Path(__file__).resolve().parent.parent / "stdio_server.py")
# Readiness is not what these tests are about: no child started by the readiness check
# (tests/e2e/test_upstream_faults_explained_e2e.py covers that).
NOT_PROBED = {"upstreams": "ignore"}


def stdio_tenants(isolation: str = "per_session") -> dict[str, Any]:
    return {
        tenant: {
            "upstream": {
                "command": [sys.executable, SERVER, tenant, f"STDIO-CANARY-{tenant}"],
                "env": {"NOTES_TENANT": tenant},
                "isolation": isolation,
            }
        }
        for tenant in TENANTS
    }


@pytest.fixture
async def stdio_proxy(make_proxy: StartProxy) -> RunningProxy:
    return await make_proxy(
        dict.fromkeys(TENANTS, "http://unused.invalid/mcp"), tenants=stdio_tenants(), readiness=NOT_PROBED
    )


def structured(result: Any) -> Any:
    return result.structured_content


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


async def exited(pid: int, timeout: float = 15.0) -> bool:
    """Whether the process has exited within `timeout` (polled: a child's exit is not an event here)."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_each_tenant_reaches_its_own_process(stdio_proxy: RunningProxy, mode: str) -> None:
    pids = {}
    for tenant in TENANTS:
        async with client_for(stdio_proxy.url, stdio_proxy.token(tenant), mode) as client:
            who = structured(await client.call_tool("whoami", {}))
            assert who["server_tenant"] == tenant
            assert who["canary"] == f"STDIO-CANARY-{tenant}"
            pids[tenant] = who["pid"]
            await client.call_tool("add_note", {"tenant_id": tenant, "text": f"{tenant}-{mode}-secret"})
            notes = structured(await client.call_tool("list_notes", {"tenant_id": tenant}))
            assert f"{tenant}-{mode}-secret" in notes["notes"]
    assert pids["acme"] != pids["globex"]
    assert os.getpid() not in pids.values()


async def test_state_of_one_tenant_is_invisible_to_the_other(stdio_proxy: RunningProxy) -> None:
    async with client_for(stdio_proxy.url, stdio_proxy.token("acme")) as acme:
        await acme.call_tool("add_note", {"tenant_id": "shared-name", "text": "acme wrote this"})
    async with client_for(stdio_proxy.url, stdio_proxy.token("globex")) as globex:
        notes = structured(await globex.call_tool("list_notes", {"tenant_id": "shared-name"}))
    assert notes["notes"] == []
    assert notes["canary"] == "STDIO-CANARY-globex"


async def test_children_get_only_the_configured_environment(stdio_proxy: RunningProxy) -> None:
    assert os.environ[DEV_SECRET_ENV] == DEV_SECRET
    async with client_for(stdio_proxy.url, stdio_proxy.token("acme")) as client:
        names = structured(await client.call_tool("environment_names", {}))["result"]
    assert DEV_SECRET_ENV not in names
    assert "NOTES_TENANT" in names
    assert set(names) <= {"NOTES_TENANT", "LC_CTYPE", "PWD"}  # what the interpreter may add itself


async def test_per_session_isolation_gives_each_session_its_own_process(stdio_proxy: RunningProxy) -> None:
    async with (
        client_for(stdio_proxy.url, stdio_proxy.token("acme", "alice"), "legacy") as first,
        client_for(stdio_proxy.url, stdio_proxy.token("acme", "bob"), "legacy") as second,
    ):
        pid_one = structured(await first.call_tool("whoami", {}))["pid"]
        pid_two = structured(await second.call_tool("whoami", {}))["pid"]
        await first.call_tool("add_note", {"tenant_id": "acme", "text": "alice only"})
        assert structured(await second.call_tool("list_notes", {"tenant_id": "acme"}))["notes"] == []
    assert pid_one != pid_two
    for pid in (pid_one, pid_two):  # the session ended (DELETE): its process went with it
        assert await exited(pid)


async def test_per_tenant_isolation_shares_one_process_between_sessions(make_proxy: StartProxy) -> None:
    running = await make_proxy(
        dict.fromkeys(TENANTS, "http://unused.invalid/mcp"),
        tenants=stdio_tenants("per_tenant"),
        readiness=NOT_PROBED,
    )
    async with (
        client_for(running.url, running.token("acme", "alice"), "legacy") as first,
        client_for(running.url, running.token("acme", "bob"), "legacy") as second,
    ):
        pid_one = structured(await first.call_tool("whoami", {}))["pid"]
        pid_two = structured(await second.call_tool("whoami", {}))["pid"]
        other = structured(await first.call_tool("list_notes", {"tenant_id": "acme"}))
    assert pid_one == pid_two
    assert other["canary"] == "STDIO-CANARY-acme"


async def test_server_to_client_requests_reach_their_own_session(stdio_proxy: RunningProxy) -> None:
    asked: list[str] = []

    async def answer(context: ClientRequestContext, params: ElicitRequestParams) -> ElicitResult:
        asked.append(params.message)
        return ElicitResult(action="accept", content={"answer": "forty-two"})

    async with client_for(
        stdio_proxy.url, stdio_proxy.token("acme"), "legacy", elicitation_callback=answer
    ) as client:
        result = structured(await client.call_tool("ask", {"question": "what is the answer?"}))
    assert result == {"action": "accept", "answer": "forty-two", "canary": "STDIO-CANARY-acme"}
    assert asked == ["what is the answer?"]


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_a_killed_child_is_restarted_and_the_other_tenant_notices_nothing(
    stdio_proxy: RunningProxy, mode: str
) -> None:
    async with client_for(stdio_proxy.url, stdio_proxy.token("globex"), mode) as globex:
        globex_pid = structured(await globex.call_tool("whoami", {}))["pid"]
        async with client_for(stdio_proxy.url, stdio_proxy.token("acme"), mode) as acme:
            acme_pid = structured(await acme.call_tool("whoami", {}))["pid"]
            os.kill(acme_pid, signal.SIGKILL)
            if mode == "legacy":  # the session died with its process
                with pytest.raises(MCPError):
                    await acme.call_tool("whoami", {})
            else:  # stateless: an error if the call beats the proxy to the exit, else a fresh child
                try:
                    outcome = structured(await acme.call_tool("whoami", {}))["pid"]  # a pid: > 0
                except MCPError as error:
                    outcome = error.error.code
                assert outcome in (-32010, -32011) or (outcome > 0 and outcome != acme_pid)
            assert structured(await globex.call_tool("whoami", {}))["pid"] == globex_pid
        if mode == "auto":  # stateless: the next request starts a fresh child
            async with client_for(stdio_proxy.url, stdio_proxy.token("acme"), mode) as acme:
                fresh = structured(await acme.call_tool("whoami", {}))["pid"]
            assert fresh != acme_pid
        else:  # the session died with its process; a new session gets a new one
            async with client_for(stdio_proxy.url, stdio_proxy.token("acme"), mode) as acme:
                fresh = structured(await acme.call_tool("whoami", {}))["pid"]
            assert fresh != acme_pid
        assert structured(await globex.call_tool("whoami", {}))["pid"] == globex_pid


async def test_a_crashing_tool_fails_only_its_own_call(stdio_proxy: RunningProxy) -> None:
    async with client_for(stdio_proxy.url, stdio_proxy.token("acme")) as client:
        with pytest.raises(MCPError) as failure:
            await client.call_tool("crash", {})
        assert failure.value.error.code == -32010
        assert "exited" in failure.value.error.message
        # (the next call waits out the restart backoff itself)
        assert structured(await client.call_tool("whoami", {}))["server_tenant"] == "acme"


async def _raw_whoami(url: str, token: str, modern: bool) -> int:
    """whoami over raw HTTP (no client left to unwind after the proxy is gone)."""
    import aiohttp

    base = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    async with aiohttp.ClientSession() as http:
        if modern:
            headers = {
                **base,
                "MCP-Protocol-Version": "2026-07-28",
                "Mcp-Method": "tools/call",
                "Mcp-Name": "whoami",
            }
            params: dict[str, Any] = {"name": "whoami", "arguments": {}, "_meta": meta}
        else:
            init = {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "1"},
            }
            body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init}
            async with http.post(url, json=body, headers=base) as response:
                await response.read()
                session = response.headers["Mcp-Session-Id"]
            headers = {**base, "Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"}
            params = {"name": "whoami", "arguments": {}}
        body = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": params}
        async with http.post(url, json=body, headers=headers) as response:
            text = await response.text()
    data = text.split("data: ", 1)[1] if text.startswith(("event:", "id:", "data:")) else text
    return int(json.loads(data)["result"]["structuredContent"]["pid"])


async def test_shutdown_leaves_no_child(tmp_path: Path, rsa_keys: Any) -> None:
    from proxy.config import ProxyConfig
    from proxy.http.server import start_server
    from tests.conftest import proxy_config
    from tests.upstreams import free_port

    url = f"http://127.0.0.1:{free_port()}/mcp"
    data = proxy_config(url, dict.fromkeys(TENANTS, "http://unused.invalid/mcp"), tmp_path, rsa_keys)
    data["tenants"] = stdio_tenants()
    runner, _ = await start_server(ProxyConfig.model_validate(data))
    running = RunningProxy(url, None, runner.app)
    pids = [await _raw_whoami(url, running.token(t), modern) for t in TENANTS for modern in (True, False)]
    assert len(set(pids)) == 4
    assert all(alive(pid) for pid in pids)
    await runner.cleanup()
    assert not any(alive(pid) for pid in pids)


def test_demo_style_config_has_a_stdio_tenant() -> None:
    data = json.dumps(stdio_tenants())
    assert "stdio_server.py" in data


# --- request ids are the proxy's on a child: cancels, logs and subscriptions find their caller -------


async def _events(client: Any, tag: str, final: str) -> list[str]:
    for _ in range(50):
        events = structured(await client.call_tool("slow_events", {"tag": tag}))["result"]
        if final in events:
            return list(events)
        await asyncio.sleep(0.1)
    return list(events)


@pytest.mark.parametrize("isolation", ["per_tenant", "per_session"])
async def test_a_cancel_reaches_the_callers_own_request_and_no_other(
    make_proxy: StartProxy, isolation: str
) -> None:
    running = await make_proxy(
        dict.fromkeys(TENANTS, "http://unused.invalid/mcp"),
        policies={"acme": {"tenant_arguments": {"names": ["tenant_id"], "on_mismatch": "reject"}}},
        tenants=stdio_tenants(isolation),
        readiness=NOT_PROBED,
    )
    async with (
        client_for(running.url, running.token("acme", "alice"), "legacy") as alice,
        client_for(running.url, running.token("acme", "bob"), "legacy") as bob,
    ):
        await bob.list_tools()
        call = asyncio.create_task(alice.call_tool("slow", {"tag": "alice", "seconds": 1.5}))
        await asyncio.sleep(0.5)
        # Bob cancels every small id: his ids, which may equal the proxy ids of alice's requests.
        for request_id in range(40):
            await bob.session.send_notification(
                t.CancelledNotification(params=t.CancelledNotificationParams(request_id=request_id))
            )
        result = await asyncio.wait_for(call, 10)
        assert result.content[0].text == "slow alice done"
        assert await _events(alice, "alice", "finished") == ["started", "finished"]

        # A cancel of alice's own, after requests answered by the proxy itself shifted the numbering.
        for _ in range(2):
            with pytest.raises(MCPError):
                await alice.call_tool("add_note", {"tenant_id": "globex", "text": "x"})
        own = asyncio.create_task(alice.call_tool("slow", {"tag": "own", "seconds": 5}))
        await asyncio.sleep(0.5)
        own.cancel()
        assert await _events(alice, "own", "cancelled") == ["started", "cancelled"]
        assert structured(await alice.call_tool("whoami", {}))["server_tenant"] == "acme"


async def test_log_messages_of_a_call_reach_its_caller_in_the_modern_era(stdio_proxy: RunningProxy) -> None:
    logged: list[str] = []

    async def on_log(params: Any) -> None:
        logged.append(str(params.data))

    async with client_for(
        stdio_proxy.url, stdio_proxy.token("acme"), "auto", log_level="debug", logging_callback=on_log
    ) as client:
        assert client.protocol_version == "2026-07-28"
        result = await client.call_tool("slow", {"tag": "logged", "seconds": 0.05})
    assert result.content[0].text == "slow logged done"
    assert logged == ["slow logged started"]


async def test_resource_updates_on_a_shared_child_reach_the_subscribed_sessions_only(
    make_proxy: StartProxy,
) -> None:
    running = await make_proxy(
        dict.fromkeys(TENANTS, "http://unused.invalid/mcp"),
        tenants=stdio_tenants("per_tenant"),
        readiness=NOT_PROBED,
    )
    updates: dict[str, list[str]] = {"alice": [], "bob": [], "carol": []}

    def handler(name: str) -> Any:
        async def on_message(message: Any) -> None:
            if isinstance(message, t.ResourceUpdatedNotification):
                updates[name].append(str(message.params.uri))

        return on_message

    uri = "notes://acme/today"
    async with (
        client_for(
            running.url, running.token("acme", "alice"), "legacy", message_handler=handler("alice")
        ) as alice,
        client_for(
            running.url, running.token("acme", "bob"), "legacy", message_handler=handler("bob")
        ) as bob,
        client_for(
            running.url, running.token("acme", "carol"), "legacy", message_handler=handler("carol")
        ) as carol,
    ):
        with warnings.catch_warnings():  # resources/subscribe is handshake-era only, as used here
            warnings.simplefilter("ignore")
            await alice.subscribe_resource(uri)
            await bob.subscribe_resource(uri)
        await carol.call_tool("touch", {"uri": uri})
        await asyncio.sleep(0.5)
        assert updates == {"alice": [uri], "bob": [uri], "carol": []}
        # Alice unsubscribes: the child stays subscribed for bob, who still gets the updates.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            await alice.unsubscribe_resource(uri)
        assert structured(await carol.call_tool("subscriptions", {}))["result"] == [uri]
        await carol.call_tool("touch", {"uri": uri})
        await asyncio.sleep(0.5)
        assert updates == {"alice": [uri], "bob": [uri, uri], "carol": []}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            await bob.unsubscribe_resource(uri)
        assert structured(await carol.call_tool("subscriptions", {}))["result"] == []


async def test_a_cancelled_users_late_log_lines_never_reach_another_users_call(
    make_proxy: StartProxy,
) -> None:
    """A shared child (per_tenant; every 2026-07-28 request shares one too, on the same code path)
    logs for a call its caller has cancelled: lines that name no request go to no other user's call."""
    mode, isolation = "legacy", "per_tenant"
    running = await make_proxy(
        dict.fromkeys(TENANTS, "http://unused.invalid/mcp"), tenants=stdio_tenants(isolation)
    )
    heard: dict[str, list[str]] = {"alice": [], "bob": []}
    first_line = asyncio.Event()

    def listener(name: str) -> Any:
        async def on_log(params: Any) -> None:
            heard[name].append(str(params.data))
            if name == "alice":
                first_line.set()

        return on_log

    async with (
        client_for(
            running.url, running.token("acme", "alice"), mode, logging_callback=listener("alice")
        ) as alice,
        client_for(running.url, running.token("acme", "bob"), mode, logging_callback=listener("bob")) as bob,
    ):
        await alice.list_tools()  # the child has served alice alone so far: her lines are hers
        chatty = asyncio.create_task(alice.call_tool("chatter", {"tag": "alice", "n": 30, "every": 0.04}))
        await asyncio.wait_for(first_line.wait(), 30)
        chatty.cancel()  # alice gives up; her tool goes on logging
        with contextlib.suppress(asyncio.CancelledError, MCPError):
            await chatty
        result = await bob.call_tool("slow", {"tag": "bob", "seconds": 0.6})
        assert "slow bob done" in result.content[0].text
    assert not [line for line in heard["bob"] if "chatter alice" in line]


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_a_finished_calls_background_log_lines_never_reach_another_users_call(
    make_proxy: StartProxy, mode: str
) -> None:
    """Alice's call has been answered; her tool goes on logging in the background on the tenant's
    shared process (per_tenant; 2026-07-28 requests always share one). Those lines name no request:
    none reaches bob's call in flight meanwhile; they are dropped and counted."""
    from tests.e2e.test_runtime_metrics_e2e import scrape, value

    running = await make_proxy(
        dict.fromkeys(TENANTS, "http://unused.invalid/mcp"),
        tenants=stdio_tenants("per_tenant"),
        readiness=NOT_PROBED,
    )
    heard: dict[str, list[str]] = {"alice": [], "bob": []}

    def listener(name: str) -> Any:
        async def on_log(params: Any) -> None:
            heard[name].append(str(params.data))

        return on_log

    options: dict[str, Any] = {"log_level": "debug"} if mode == "auto" else {}
    async with (
        client_for(
            running.url, running.token("acme", "alice"), mode, logging_callback=listener("alice"), **options
        ) as alice,
        client_for(
            running.url, running.token("acme", "bob"), mode, logging_callback=listener("bob"), **options
        ) as bob,
    ):
        started = await alice.call_tool("background_chatter", {"tag": "alice", "n": 400, "every": 0.01})
        assert started.content[0].text == "background alice started"
        result = await bob.call_tool("slow", {"tag": "bob", "seconds": 1.0})
        assert "slow bob done" in result.content[0].text
        samples = await scrape(running)
    assert not [line for line in heard["bob"] if "alice" in line]
    dropped = value(samples, "mcp_proxy_unattributed_notifications_dropped_total", tenant="acme")
    assert dropped is not None and dropped > 0  # her lines did arrive, and went to nobody
