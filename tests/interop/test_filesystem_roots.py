"""The real @modelcontextprotocol/server-filesystem behind the proxy: client roots cannot widen it.

server-filesystem replaces the directories it was started with by the client's roots when the client
offers them. Each tenant gets its own filesystem server over stdio, started on its own directory
with a canary file. Acme's client answers roots/list with globex's directory: by default the
upstream never learns of the client's roots, so acme still sees only acme's directory.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

import pytest
from mcp_types import ListRootsResult, Root

from proxy.demo import client_for
from tests.conftest import TENANTS, RunningProxy, StartProxy
from tests.interop.conftest import node_package

pytestmark = pytest.mark.e2e


def text_of(result: Any) -> str:
    return " ".join(getattr(block, "text", "") for block in getattr(result, "content", []))


async def filesystem_proxy(
    make_proxy: StartProxy, tmp_path: Path, client_capabilities: dict[str, Any] | None
) -> tuple[RunningProxy, dict[str, Path], dict[str, str]]:
    server = node_package("@modelcontextprotocol/server-filesystem")
    directories, canaries = {}, {}
    for tenant in TENANTS:
        directory = tmp_path / f"files-{tenant}"
        directory.mkdir()
        canaries[tenant] = f"CANARY-{tenant}-{secrets.token_hex(6)}"
        (directory / "secret.txt").write_text(canaries[tenant])
        directories[tenant] = directory.resolve()
    policy: dict[str, Any] = {"tenant_arguments": {"names": ["tenant_id"]}}
    if client_capabilities is not None:
        policy["client_capabilities"] = client_capabilities
    running = await make_proxy(
        dict.fromkeys(TENANTS, "http://unused.invalid/mcp"),
        policies=dict.fromkeys(TENANTS, policy),
        tenants={
            t: {"upstream": {"command": ["node", str(server), str(directories[t])]}, "policy": t}
            for t in TENANTS
        },
    )
    return running, directories, canaries


def foreign_roots(directory: Path) -> Any:
    async def list_roots(context: Any) -> ListRootsResult:
        return ListRootsResult(roots=[Root(uri=directory.as_uri(), name="not mine")])

    return list_roots


async def allowed_directories(client: Any) -> str:
    return text_of(await client.call_tool("list_allowed_directories", {}))


async def test_a_client_cannot_point_the_filesystem_server_at_another_tenants_directory(
    make_proxy: StartProxy, tmp_path: Path
) -> None:
    running, directories, canaries = await filesystem_proxy(make_proxy, tmp_path, None)
    callback = foreign_roots(directories["globex"])
    async with client_for(
        running.url, running.token("acme"), "legacy", list_roots_callback=callback
    ) as client:
        own = text_of(
            await client.call_tool("read_text_file", {"path": str(directories["acme"] / "secret.txt")})
        )
        await asyncio.sleep(1.0)  # the server asks for roots about 0.35 s after initialized, if it may
        allowed = await allowed_directories(client)
        foreign = await client.call_tool(
            "read_text_file", {"path": str(directories["globex"] / "secret.txt")}
        )
    assert canaries["acme"] in own
    assert str(directories["acme"]) in allowed and str(directories["globex"]) not in allowed
    assert foreign.is_error
    assert canaries["globex"] not in text_of(foreign)


async def test_with_roots_allowed_the_same_client_takes_over_the_other_directory(
    make_proxy: StartProxy, tmp_path: Path
) -> None:
    """The control: the attack the default prevents is real against this server."""
    running, directories, canaries = await filesystem_proxy(make_proxy, tmp_path, {"roots": "allow"})
    callback = foreign_roots(directories["globex"])
    async with client_for(
        running.url, running.token("acme"), "legacy", list_roots_callback=callback
    ) as client:
        deadline = asyncio.get_running_loop().time() + 60  # generous: the machine may be loaded
        while str(directories["globex"]) not in await allowed_directories(client):  # adopted yet?
            assert asyncio.get_running_loop().time() < deadline, "the server never adopted the roots"
            await asyncio.sleep(0.05)
        stolen = await client.call_tool("read_text_file", {"path": str(directories["globex"] / "secret.txt")})
    assert canaries["globex"] in text_of(stolen)
