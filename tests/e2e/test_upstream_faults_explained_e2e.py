"""Upstreams that cannot be reached or cannot start say why: in the log, to the client, in /readyz.

The first hour with real MCP servers goes wrong in a few ways: an `npx`/`uvx` program run with the
child's empty environment exits at once, a program is missing, an HTTP upstream is not listening.
Each is logged at warning with what to look at (program, exit code or errno and its last stderr
lines; the URL without credentials and the reason), the client's error says what to check without
the upstream's own words, and /readyz counts such an upstream as unreachable.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from mcp import MCPError

from proxy.demo import client_for
from tests.conftest import TENANTS, RunningProxy, StartProxy
from tests.factories import HANDSHAKE_INITIALIZE
from tests.upstreams import free_port

pytestmark = pytest.mark.e2e

SERVER = str(Path(__file__).resolve().parent.parent / "stdio_server.py")
# A program that fails the way `npx some-server` does without PATH: a line on stderr, exit 127.
EXITS_AT_ONCE = ["/bin/sh", "-c", "echo 'sh: 1: some-mcp-server: not found' >&2; exit 127"]


def stdio_tenant(command: list[str], **upstream: Any) -> dict[str, Any]:
    return {"upstream": {"command": command, **upstream}}


def server_command(tenant: str) -> list[str]:
    return [sys.executable, SERVER, tenant, f"CANARY-{tenant}"]


async def initialize_error(running: RunningProxy, tenant: str) -> dict[str, Any]:
    status, _, body = await running.post(HANDSHAKE_INITIALIZE, token=running.token(tenant))
    answer = json.loads(body)
    assert "error" in answer, (status, answer)
    return dict(answer["error"])


async def readyz(running: RunningProxy) -> tuple[int, dict[str, Any]]:
    base = running.url.removesuffix("/mcp")
    async with aiohttp.ClientSession() as http, http.get(f"{base}/readyz") as response:
        return response.status, await response.json()


async def checked_readyz(running: RunningProxy) -> tuple[int, dict[str, Any]]:
    """/readyz once the background check has run (it starts with the proxy)."""
    for _ in range(400):
        status, body = await readyz(running)
        if body["checked"]:
            return status, body
        await asyncio.sleep(0.05)
    raise AssertionError("the readiness check never ran")


async def test_inherit_env_copies_only_the_named_variables(
    make_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FIRST_HOUR_SHARED", "from-the-proxy")
    monkeypatch.setenv("FIRST_HOUR_PRIVATE", "never-copied")
    tenants = {
        "acme": stdio_tenant(server_command("acme"), inherit_env=["PATH", "FIRST_HOUR_SHARED", "NOT_SET_X"]),
        "globex": stdio_tenant(server_command("globex")),
    }
    running = await make_proxy(dict.fromkeys(TENANTS, "http://unused.invalid/mcp"), tenants=tenants)
    names = {}
    for tenant in TENANTS:
        async with client_for(running.url, running.token(tenant)) as client:
            names[tenant] = set(
                (await client.call_tool("environment_names", {})).structured_content["result"]
            )
    assert {"PATH", "FIRST_HOUR_SHARED"} <= names["acme"]
    assert "FIRST_HOUR_PRIVATE" not in names["acme"] and "NOT_SET_X" not in names["acme"]
    assert not names["globex"] & {"PATH", "FIRST_HOUR_SHARED", "FIRST_HOUR_PRIVATE"}  # nothing by default


async def test_a_child_that_exits_at_once_is_explained_to_the_operator_and_the_client(
    make_proxy: StartProxy,
) -> None:
    tenants = {"acme": stdio_tenant(EXITS_AT_ONCE), "globex": stdio_tenant(server_command("globex"))}
    running = await make_proxy(dict.fromkeys(TENANTS, "http://unused.invalid/mcp"), tenants=tenants)
    with structlog.testing.capture_logs() as logs:
        error = await initialize_error(running, "acme")
        async with client_for(running.url, running.token("acme"), "2026-07-28") as client:
            with pytest.raises(MCPError) as modern:  # the modern era's shared child: the same explanation
                await client.list_tools()
    assert error["code"] == -32010
    for message in (error["message"], modern.value.error.message):
        assert "exit 127: command not found" in message
        assert "upstream.env or upstream.inherit_env" in message
        assert "some-mcp-server" not in message  # the upstream's own words stay in the log
    failures = [line for line in logs if line["event"] == "stdio_start_failed"]
    assert failures and all(line["log_level"] == "warning" for line in failures)
    assert failures[0]["program"] == "/bin/sh"
    assert failures[0]["returncode"] == 127
    assert failures[0]["stderr_tail"] == ["sh: 1: some-mcp-server: not found"]
    async with client_for(running.url, running.token("globex")) as client:  # the other tenant is fine
        assert (await client.call_tool("whoami", {})).structured_content["server_tenant"] == "globex"


async def test_a_program_that_does_not_exist_is_named(make_proxy: StartProxy) -> None:
    tenants = {t: stdio_tenant(["no-such-mcp-server-program"]) for t in TENANTS}
    running = await make_proxy(dict.fromkeys(TENANTS, "http://unused.invalid/mcp"), tenants=tenants)
    with structlog.testing.capture_logs() as logs:
        error = await initialize_error(running, "acme")
    assert "no-such-mcp-server-program: not found on the proxy's PATH" in error["message"]
    failure = next(line for line in logs if line["event"] == "stdio_start_failed")
    assert failure["log_level"] == "warning"
    assert failure["program"] == "no-such-mcp-server-program"


async def test_readyz_counts_a_stdio_program_that_cannot_start_as_unreachable(make_proxy: StartProxy) -> None:
    tenants = {"acme": stdio_tenant(EXITS_AT_ONCE), "globex": stdio_tenant(server_command("globex"))}
    with structlog.testing.capture_logs() as logs:
        running = await make_proxy(
            dict.fromkeys(TENANTS, "http://unused.invalid/mcp"),
            tenants=tenants,
            readiness={"upstreams": "all", "check_interval_seconds": 0.2},
        )
        status, body = await checked_readyz(running)
    assert status == 503
    assert body["upstreams"] == {"reachable": 1, "total": 2, "required": "all"}
    unreachable = next(line for line in logs if line["event"] == "upstream_unreachable")
    assert unreachable["tenant"] == "acme" and unreachable["program"] == "/bin/sh"
    assert "exit 127" in unreachable["reason"] and "some-mcp-server: not found" in unreachable["reason"]


async def test_an_unreachable_http_upstream_is_logged_with_its_url_without_credentials(
    make_proxy: StartProxy, upstreams: dict[str, Any]
) -> None:
    port = free_port()  # nothing listens there
    url = f"http://operator:hunter2-secret@127.0.0.1:{port}/mcp?api_key=abc123"
    with structlog.testing.capture_logs() as logs:
        running = await make_proxy({"acme": url, "globex": upstreams["globex"]})
        error = await initialize_error(running, "acme")
        await checked_readyz(running)
    assert error["code"] == -32010
    lines = [line for line in logs if line["event"] == "upstream_unreachable"]
    assert {line.get("tenant") for line in lines} >= {"acme"}  # the request's own warning ...
    assert any("tenant" not in line for line in lines)  # ... and the readiness check's
    for line in lines:
        assert line["log_level"] == "warning"
        assert line["url"] == f"http://127.0.0.1:{port}/mcp?api_key=..."
        assert line["reason"] == os.strerror(errno.ECONNREFUSED)
    assert "hunter2" not in repr(logs) and "abc123" not in repr(logs)
