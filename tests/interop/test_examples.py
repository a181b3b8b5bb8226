"""examples/ as a reader uses it: real-servers.yaml in front of the npm and PyPI servers it names,
and each client command of examples/README.md run as written there.

What differs from the page, and why: the proxy listens on a free port instead of 8080, and its
metrics listener on a free port instead of 9464 (tests run side by side); `npx` finds the servers
already installed in tests/interop/node_modules (the proxy runs there), so nothing is downloaded;
the Inspector's CLI is its `inspector-cli` package (what `npx @modelcontextprotocol/inspector
--cli` runs); where `uvx` is not installed, mcp-server-time runs from this Python environment (the
`test` extra installs it), as `uvx` would run it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.demo import client_for
from tests.factories import DEV_SECRET
from tests.interop.conftest import MODULES, node_package
from tests.upstreams import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent.parent
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent
INSPECTOR_NPX = "npx -y @modelcontextprotocol/inspector@0.16.8"


@dataclass
class RealServers:
    url: str
    files: dict[str, Path]
    canaries: dict[str, str]
    work: Path  # examples/ copied beside a node_modules, where the README's commands run
    log: Path
    config: Path  # real-servers.yaml as run here (its port)

    def env(self, tenant: str) -> dict[str, str]:
        token = subprocess.run(
            [str(BIN / "mcp-tenant-proxy"), "mint-token", "--config", str(self.config),
             "--issuer", "dev", "--tenant", tenant, "--sub", "alice"],
            capture_output=True, text=True, check=True,
            env={**os.environ, "MCP_PROXY_DEV_SECRET": DEV_SECRET},
        ).stdout.strip()  # fmt: skip
        return {**os.environ, "MCP_TOKEN": token, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def readme_command(prefix: str) -> str:
    """The one command line of examples/README.md that starts with `prefix`."""
    lines = [line for line in (EXAMPLES / "README.md").read_text().splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, f"examples/README.md should show one `{prefix} ...` command"
    return lines[0]


def config_as_run_here(port: int) -> str:
    text = (EXAMPLES / "real-servers.yaml").read_text().replace(":8080", f":{port}")
    text = text.replace("port: 8080", f"port: {port}")
    text += f"\nmetrics: {{listen: {{host: 127.0.0.1, port: {free_port()}}}}}\n"
    if shutil.which("uvx") is None:
        server = shutil.which("mcp-server-time", path=str(BIN))
        if server is None:
            pytest.skip("neither uvx nor mcp-server-time is installed (pip install -e '.[test]')")
        text = text.replace("command: [uvx, mcp-server-time]", f"command: [{server}]")
    return text


def wait_until_every_upstream_answers(base: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120  # each server's first start: node, then the package's imports
    body: Any = None
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=5) as response:  # noqa: S310 - loopback
                body = json.loads(response.read())
        except OSError as error:  # 503 (HTTPError) until the checks ran, or not listening yet
            body = json.loads(error.read()) if hasattr(error, "read") else None
        if body and body["upstreams"]["reachable"] == body["upstreams"]["total"] == 4:
            return
        time.sleep(0.2)
    raise AssertionError(f"not every upstream answered: {body}\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def real_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServers]:
    node_package("@modelcontextprotocol/server-everything")
    node_package("@modelcontextprotocol/server-filesystem")
    tmp = tmp_path_factory.mktemp("real-servers")
    files, canaries = {}, {}
    for tenant in ("acme", "globex"):
        files[tenant] = tmp / "files" / tenant
        files[tenant].mkdir(parents=True)
        canaries[tenant] = f"CANARY-files-{tenant}-{os.getpid()}"
        (files[tenant] / "secret.txt").write_text(canaries[tenant])
    config_dir = tmp / "config"
    shutil.copytree(EXAMPLES / "policies", config_dir / "policies")
    port = free_port()
    (config_dir / "real-servers.yaml").write_text(config_as_run_here(port))
    work = tmp / "work"
    shutil.copytree(EXAMPLES, work / "examples")
    (work / "node_modules").symlink_to(MODULES)  # what `npm install @modelcontextprotocol/sdk` gives
    log = tmp / "proxy.log"
    env = {**os.environ, "MCP_PROXY_DEV_SECRET": DEV_SECRET, "MCP_FILES_DIR": str(tmp / "files")}
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(config_dir / "real-servers.yaml")],
            cwd=MODULES.parent, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_every_upstream_answers(base, process, log)
        yield RealServers(f"{base}/mcp", files, canaries, work, log, config_dir / "real-servers.yaml")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def run_readme_command(servers: RealServers, tenant: str, command: str) -> str:
    port = servers.url.split(":")[2].split("/")[0]
    command = command.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    result = subprocess.run(
        ["/bin/sh", "-c", command], cwd=servers.work, env=servers.env(tenant),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_the_python_sdk_snippet_calls_server_everything(real_servers: RealServers) -> None:
    command = readme_command("python3 examples/clients/python_client.py")
    output = run_readme_command(real_servers, "everything", command.replace("python3", sys.executable, 1))
    assert "Echo: hello from python" in output


def test_the_typescript_sdk_snippet_calls_server_everything(real_servers: RealServers) -> None:
    output = run_readme_command(
        real_servers, "everything", readme_command("node examples/clients/ts_client.mjs")
    )
    assert "Echo: hello from typescript" in output


def test_the_inspector_cli_command_calls_server_everything(real_servers: RealServers) -> None:
    cli = node_package("@modelcontextprotocol/inspector-cli", "build/cli.js")
    command = readme_command(INSPECTOR_NPX).replace(INSPECTOR_NPX, f"node {cli}", 1)
    output = run_readme_command(real_servers, "everything", command)
    assert "Echo: hello from the inspector" in json.loads(output)["content"][0]["text"]


def test_mcp_server_time_answers_through_the_proxy(real_servers: RealServers) -> None:
    command = f"{sys.executable} examples/clients/python_client.py http://127.0.0.1:8080/mcp get_current_time"
    output = run_readme_command(real_servers, "time", f'{command} \'{{"timezone": "Europe/Paris"}}\'')
    assert json.loads(output)["timezone"] == "Europe/Paris"


async def test_each_tenants_filesystem_server_stays_on_its_own_directory(real_servers: RealServers) -> None:
    """server-filesystem per tenant, started on the tenant's directory; the client's roots (here:
    the other tenant's directory) never reach it."""

    async def offer_the_other_directory(context: Any) -> Any:
        from mcp_types import ListRootsResult, Root

        return ListRootsResult(roots=[Root(uri=real_servers.files["globex"].resolve().as_uri())])

    token = real_servers.env("files-acme")["MCP_TOKEN"]
    async with client_for(
        real_servers.url, token, "legacy", list_roots_callback=offer_the_other_directory
    ) as client:
        own = await client.call_tool(
            "read_text_file", {"path": str(real_servers.files["acme"] / "secret.txt")}
        )
        await asyncio.sleep(1.0)  # the server asks for roots about 0.35 s after initialized, if it may
        allowed = await client.call_tool("list_allowed_directories", {})
        foreign = await client.call_tool(
            "read_text_file", {"path": str(real_servers.files["globex"] / "secret.txt")}
        )

    def text(result: Any) -> str:
        return " ".join(getattr(block, "text", "") for block in result.content)

    assert text(own) == real_servers.canaries["acme"]
    assert str(real_servers.files["acme"].resolve()) in text(allowed)
    assert "globex" not in text(allowed)
    assert foreign.is_error and real_servers.canaries["globex"] not in text(foreign)
