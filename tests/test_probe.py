"""`check-config --probe` tries what a valid config points at and prints one line per problem.

Run as an operator runs it (a process of its own) against real things on loopback: an SDK upstream,
a stdio SDK server, a JWKS endpoint; and against the ways they go wrong: nothing listening, a 401,
a program that exits at once, a JWKS URL without keys, a Redis that is not there.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from tests.factories import DEV_SECRET, DEV_SECRET_ENV, RsaKeys, config_dict
from tests.redis_server import require_redis_server
from tests.upstreams import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
SERVER = str(ROOT / "tests" / "stdio_server.py")
EXITS_AT_ONCE = ["/bin/sh", "-c", "echo 'sh: 1: some-mcp-server: not found' >&2; exit 127"]


@pytest.fixture
async def web_server() -> AsyncIterator[str]:
    """A loopback HTTP server: a JWKS at /jwks.json, nothing at /missing.json, 401 at /mcp."""
    keys = RsaKeys.generate("probe-key")

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response({"keys": [keys.jwk()]})

    async def unauthorized(request: web.Request) -> web.Response:
        return web.json_response({"error": "invalid_token"}, status=401)

    app = web.Application()
    app.router.add_get("/jwks.json", jwks)
    app.router.add_post("/mcp", unauthorized)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


REDIS_PASSWORD = "probe-redis-password-7f3a"


@pytest.fixture
def redis_with_password() -> Iterator[int]:
    """A redis-server that requires REDIS_PASSWORD; yields its port."""
    port = free_port()
    process = subprocess.Popen(
        [require_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--requirepass", REDIS_PASSWORD],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                    sock.sendall(f"AUTH {REDIS_PASSWORD}\r\nPING\r\n".encode())
                    reply = b""
                    while reply.count(b"\r\n") < 2 and (chunk := sock.recv(64)):
                        reply += chunk
                    if reply.endswith(b"+PONG\r\n"):
                        break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)
        yield port
    finally:
        process.kill()
        process.wait(10)


def jwks_issuer(url: str) -> dict[str, Any]:
    return {"issuer": "https://idp.test", "algorithms": ["RS256"], "jwks_url": url, "tenant_claim": "org"}


async def check_config(tmp_path: Path, data: dict[str, Any]) -> tuple[int, str, str]:
    """`check-config --probe` in its own process, while this test's servers keep serving."""
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(data))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "check-config", "--config", str(path), "--probe",
        cwd=ROOT, env={**os.environ, DEV_SECRET_ENV: DEV_SECRET},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_a_config_whose_upstreams_keys_and_programs_all_answer_passes(
    tmp_path: Path, upstreams: dict[str, Any], web_server: str, redis_with_password: int
) -> None:
    data = config_dict({"acme": upstreams["acme"].url})
    data["state"] = {
        "backend": "redis",
        "url": f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_with_password}/0",
    }
    data["auth"]["issuers"].append(jwks_issuer(f"{web_server}/jwks.json"))
    data["tenants"]["globex"] = {"upstream": {"command": [sys.executable, SERVER, "globex", "CANARY-g"]}}
    code, stdout, stderr = await check_config(tmp_path, data)
    assert (code, stderr) == (0, "")
    assert "every upstream, JWKS URL and state backend answered" in stdout


async def test_each_problem_is_one_line_naming_the_key_and_the_reason(
    tmp_path: Path, web_server: str
) -> None:
    closed_port, redis_port = free_port(), free_port()
    data = config_dict(
        {"acme": f"http://user:pw-secret@127.0.0.1:{closed_port}/mcp", "globex": f"{web_server}/mcp"}
    )
    data["tenants"]["initech"] = {"upstream": {"command": EXITS_AT_ONCE}}
    data["tenants"]["umbrella"] = {"upstream": {"command": ["no-such-mcp-server-program"]}}
    data["auth"]["issuers"].append(jwks_issuer(f"{web_server}/missing.json"))
    data["state"] = {"backend": "redis", "url": f"redis://:redis-pw@127.0.0.1:{redis_port}/0"}
    code, stdout, stderr = await check_config(tmp_path, data)
    assert code == 2, stdout + stderr
    lines = stderr.splitlines()
    path = tmp_path / "proxy.yaml"
    expected = {
        "tenants.acme.upstream.url": f"http://127.0.0.1:{closed_port}/mcp: unreachable (Connection refused)",
        "tenants.globex.upstream.url": f"{web_server}/mcp: answered HTTP 401: check the tenant's credentials",
        "tenants.initech.upstream.command": "/bin/sh: could not start (exit 127: command not found); its "
        "stderr ends: sh: 1: some-mcp-server: not found; the child's environment is empty unless",
        "tenants.umbrella.upstream.command": "no-such-mcp-server-program: could not start "
        "(no-such-mcp-server-program: not found on the proxy's PATH)",
        "auth.issuers.1.jwks_url": f"{web_server}/missing.json: answered HTTP 404",
        "state.url": "Redis did not accept the connection",
    }
    assert len(lines) == len(expected), stderr
    for key_path, problem in expected.items():
        assert any(line.startswith(f"{path}: {key_path}: {problem}") for line in lines), (key_path, stderr)
    assert "pw-secret" not in stderr and "redis-pw" not in stderr


async def test_a_state_backend_that_refuses_the_credentials_is_a_problem(
    tmp_path: Path, upstreams: dict[str, Any], redis_with_password: int
) -> None:
    data = config_dict({"acme": upstreams["acme"].url})
    data["state"] = {
        "backend": "redis",
        "url": f"redis://:not-the-password@127.0.0.1:{redis_with_password}/0",
    }
    code, _, stderr = await check_config(tmp_path, data)
    assert code == 2
    assert stderr.startswith(f"{tmp_path / 'proxy.yaml'}: state.url: Redis did not accept the connection (")
    assert "AuthenticationError" in stderr and "not-the-password" not in stderr
    assert stderr.count("\n") == 1
