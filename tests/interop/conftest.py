"""Interop tests: MCP components from npm (tests/interop/package.json), run where Node.js is installed.

`tests/install-test-tools` installs them with `npm ci`; without node (or without that step) every
test here is skipped with the reason, never failed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

MODULES = Path(__file__).parent / "node_modules"


def node_package(name: str, entry: str = "dist/index.js") -> Path:
    """The entry point of an installed npm package, or a skip saying what is missing."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the npm interop components cannot run")
    path = MODULES / name / entry
    if not path.is_file():
        pytest.skip(f"{name} is not installed: run tests/install-test-tools")
    return path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.interop)


HERE = Path(__file__).parent


def node() -> str:
    path = shutil.which("node")
    if path is None:
        pytest.skip("node is not installed: the npm interop components cannot run")
    return path


@pytest.fixture(scope="session")
def everything_http() -> Iterator[str]:
    """server-everything over streamable HTTP on a free loopback port (tests/interop/everything_http.mjs)."""
    node_package("@modelcontextprotocol/server-everything")
    process = subprocess.Popen(
        [node(), str(HERE / "everything_http.mjs")],
        cwd=HERE,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # "listening <port>", once it accepts connections
        assert line.startswith("listening "), line
        yield f"http://127.0.0.1:{int(line.split()[1])}/mcp"
    finally:
        process.terminate()
        process.wait(timeout=10)


async def sdk_client(url: str, token: str | None, steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Run the TypeScript SDK client (tests/interop/sdk_client.mjs) against `url`: what each step gave."""
    node_package("@modelcontextprotocol/sdk", "package.json")
    environment = {"PATH": os.environ.get("PATH", ""), "MCP_URL": url}
    if token is not None:
        environment["MCP_TOKEN"] = token
    process = await asyncio.create_subprocess_exec(
        node(),
        str(HERE / "sdk_client.mjs"),
        json.dumps(steps),
        cwd=HERE,
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode(errors="replace")
    return dict(json.loads(stdout))
