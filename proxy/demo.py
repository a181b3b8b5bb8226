"""`mcp-tenant-proxy demo`: three tenants, real SDK upstreams, the proxy, the real SDK client.

Every tenant has an upstream process of its own: acme and globex each an SDK notes server over
streamable HTTP (started here, on free loopback ports), initech the same server over stdio, run by
the proxy. Each answer names the process id that served it, so the demo shows three distinct ones.
Nothing is read from the network; the audit files go to a temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

DEMO_SECRET_ENV = "MCP_PROXY_DEMO_SECRET"  # noqa: S105 - a variable name, not a secret
HTTP_TENANTS = ("acme", "globex")
STDIO_TENANT = "initech"
TENANTS = (*HTTP_TENANTS, STDIO_TENANT)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


UPSTREAM_START_SECONDS = 60.0


@contextlib.asynccontextmanager
async def upstream_process(tenant: str, canary: str, port: int, work_dir: Path) -> AsyncIterator[int]:
    """One tenant's SDK notes server in a process of its own on loopback (`python -m
    proxy.demo_upstream TENANT CANARY PORT`), for as long as the context lasts; yields its pid."""
    log_file = work_dir / f"upstream-{tenant}.log"
    with log_file.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.demo_upstream", tenant, canary, str(port),
            stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=output,
        )  # fmt: skip
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + UPSTREAM_START_SECONDS
        while not await _listening(port):
            if process.returncode is not None or loop.time() > deadline:
                raise RuntimeError(f"{tenant}'s demo upstream did not start: {log_file.read_text()[-2000:]}")
            await asyncio.sleep(0.05)
        yield process.pid
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


DEMO_POLICY = """\
tenant_arguments: {names: [tenant_id], on_mismatch: reject, hide_from_schema: true}
tools: {allow: ["*"], deny: []}
resources: {tenant_uri_templates: ["notes://{tenant}/{path}"]}
"""


def demo_config(
    proxy_port: int, upstreams: dict[str, str], canaries: dict[str, str], work_dir: Path
) -> dict[str, Any]:
    url = f"http://127.0.0.1:{proxy_port}/mcp"
    (work_dir / "policies").mkdir(exist_ok=True)
    (work_dir / "policies" / "demo.yaml").write_text(DEMO_POLICY)
    return {
        "listen": {"host": "127.0.0.1", "port": proxy_port, "path": "/mcp", "public_url": url},
        "metrics": {"listen": None},  # the demo reads none: no second port to find free
        "auth": {
            "authorization_servers": ["http://127.0.0.1/demo-idp"],
            "issuers": [
                {
                    "issuer": "demo",
                    "audiences": [url],
                    "algorithms": ["HS256"],
                    "secret_env": DEMO_SECRET_ENV,
                    "tenant_claim": "tenant",
                }
            ],
        },
        "tenants": {
            **{
                tenant: {
                    "upstream": {"url": upstream, "headers": {"Authorization": f"Bearer upstream-{tenant}"}},
                    "policy": "demo",
                }
                for tenant, upstream in upstreams.items()
            },
            STDIO_TENANT: {
                "upstream": {
                    "command": [
                        sys.executable,
                        "-m",
                        "proxy.demo_upstream",
                        STDIO_TENANT,
                        canaries[STDIO_TENANT],
                        "stdio",
                    ],
                },
                "policy": "demo",
            },
        },
        "policies_dir": str(work_dir / "policies"),
        "audit": {"dir": str(work_dir / "audit")},
    }


def client_for(url: str, token: str, mode: str = "auto", **options: Any) -> Any:
    """The real SDK client, sending the bearer token (options go to `mcp.Client`)."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30)
    return Client(streamable_http_client(url, http_client=http), mode=mode, **options)


def _text(result: Any) -> str:
    return " ".join(getattr(block, "text", "") for block in getattr(result, "content", []))


async def run_demo() -> int:
    from proxy.config import ProxyConfig
    from proxy.http.keys import SERVICES
    from proxy.http.server import start_server
    from proxy.layers.auth.authenticator import mint_token
    from proxy.ops.log import configure_logging

    configure_logging("error")
    logging.basicConfig(level=logging.WARNING)  # the SDK and uvicorn log through stdlib logging
    for noisy in ("httpx2", "httpx", "mcp", "uvicorn"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault(DEMO_SECRET_ENV, secrets.token_urlsafe(32))
    canaries = {tenant: f"CANARY-{tenant}-{secrets.token_hex(4)}" for tenant in TENANTS}
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}")
        if not ok:
            failures.append(what)

    async with contextlib.AsyncExitStack() as stack:
        work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mcp-proxy-demo-")))
        upstreams, pids = {}, {}
        for tenant in HTTP_TENANTS:
            port = free_port()
            upstreams[tenant] = f"http://127.0.0.1:{port}/mcp"
            pids[tenant] = await stack.enter_async_context(
                upstream_process(tenant, canaries[tenant], port, work_dir)
            )
        proxy_port = free_port()
        config = ProxyConfig.model_validate(demo_config(proxy_port, upstreams, canaries, work_dir))
        runner, _ = await start_server(config)
        stack.push_async_callback(runner.cleanup)
        url = config.listen.resource_url
        print(f"proxy on {url} (pid {os.getpid()}); one upstream process per tenant:")
        for tenant, upstream in upstreams.items():
            print(f"  {tenant} -> {upstream}, its own process (pid {pids[tenant]})")
        print(f"  {STDIO_TENANT} -> stdio processes the proxy runs for it alone")
        served_by: dict[str, set[int]] = {tenant: set() for tenant in TENANTS}

        tokens = {tenant: mint_token(config, "demo", tenant, f"alice@{tenant}") for tenant in TENANTS}
        for index, tenant in enumerate(TENANTS):
            other_tenant = TENANTS[(index + 1) % len(TENANTS)]
            other = canaries[other_tenant]
            for mode in ("auto", "legacy"):
                era = "2026-07-28" if mode == "auto" else "handshake era"
                print(f"\n{tenant} ({era}):")
                async with client_for(url, tokens[tenant], mode) as client:
                    tools = await client.list_tools()
                    print(f"  tools: {', '.join(t.name for t in tools.tools)}")
                    who = (await client.call_tool("whoami", {})).structured_content
                    print(
                        f"  whoami -> tenant {who['server_tenant']}, canary {who['canary']}, pid {who['pid']}"
                    )
                    check(who["canary"] == canaries[tenant], "answered by its own upstream")
                    served_by[tenant].add(who["pid"])
                    schema = next(t for t in tools.tools if t.name == "add_note").input_schema
                    check("tenant_id" not in schema["properties"], "tools/list hides the tenant_id argument")
                    await client.call_tool("add_note", {"text": f"hello from {tenant}"})
                    notes = json.loads(_text(await client.call_tool("list_notes", {})))
                    print(f"  list_notes -> {notes['notes']} (tenant_id filled in: {notes['tenant_id']})")
                    check(
                        notes["tenant_id"] == tenant and other not in json.dumps(notes),
                        "sees only its own notes",
                    )
                    refused = await _refusal(client.call_tool("list_notes", {"tenant_id": other_tenant}))
                    print(f"  list_notes(tenant_id={other_tenant!r}) -> {refused}")
                    check("-32005" in refused, "naming the other tenant is refused by policy")
                    refused = await _refusal(client.read_resource(f"notes://{other_tenant}/plan"))
                    check("Unknown resource" in refused, "the other tenant's resource looks like none at all")
                    if tenant == STDIO_TENANT:
                        check(
                            who["pid"] not in (os.getpid(), *pids.values()), "served by its own stdio process"
                        )
                        continue
                    check(
                        who["pid"] == pids[tenant], f"served by its own upstream process (pid {pids[tenant]})"
                    )
                    headers = json.loads(_text(await client.call_tool("request_headers", {})))["headers"]
                    check(tokens[tenant] not in json.dumps(headers), "its token never reached the upstream")
                    check(
                        headers.get("authorization") == f"Bearer upstream-{tenant}",
                        "the upstream got the tenant's own credentials",
                    )

        print("\nprocesses:")
        for tenant, found in served_by.items():
            why = (
                " (stdio: one child for the 2026-07-28 era, one per handshake session)"
                if len(found) > 1
                else ""
            )
            print(f"  {tenant} was served by pid {', '.join(str(pid) for pid in sorted(found))}{why}")
        shared = {pid for tenant in TENANTS for pid in served_by[tenant]
                  if any(pid in served_by[other] for other in TENANTS if other != tenant)}  # fmt: skip
        check(not shared, "no process served two tenants")

        print("\nsession isolation (handshake era):")
        session_id = await _initialize(url, tokens["acme"])
        check(
            await _list_tools_status(url, tokens["acme"], session_id) == 200, "acme can use its own session"
        )
        status = await _list_tools_status(url, tokens["globex"], session_id)
        check(status == 404, f"globex presenting acme's session id gets {status} (404, as for an unknown id)")
        other_user = mint_token(config, "demo", "acme", "mallory@acme")
        status = await _list_tools_status(url, other_user, session_id)
        check(status == 404, f"another acme user presenting it gets {status} (404)")

        print("\naudit (summaries only, one file per tenant):")
        runner.app[SERVICES].flush()
        for tenant in TENANTS:
            text = (work_dir / "audit" / f"{tenant}.jsonl").read_text()
            records = text.count("\n")
            clean = not any(canary in text for canary in canaries.values()) and "hello from" not in text
            check(clean, f"audit/{tenant}.jsonl: {records} records, no canary and no argument value in it")

    print("\nall isolation checks passed" if not failures else f"\n{len(failures)} check(s) FAILED")
    return 0 if not failures else 1


async def _refusal(call: Any) -> str:
    """The error a call ends with, as 'code message' ('no error' when it succeeded)."""
    from mcp import MCPError

    try:
        await call
    except MCPError as error:
        return f"{error.error.code} {error.error.message}"
    return "no error"


_HANDSHAKE_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


async def _initialize(url: str, token: str) -> str:
    """A raw handshake-era initialize; returns the session id the proxy issued."""
    import aiohttp

    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "demo", "version": "1"},
        },
    }
    headers = {**_HANDSHAKE_HEADERS, "Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as response:
        await response.read()
        return response.headers["Mcp-Session-Id"]


async def _list_tools_status(url: str, token: str, session_id: str) -> int:
    import aiohttp

    body = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}
    headers = {
        **_HANDSHAKE_HEADERS,
        "Authorization": f"Bearer {token}",
        "Mcp-Session-Id": session_id,
        "MCP-Protocol-Version": "2025-11-25",
    }
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as response:
        await response.read()
        return response.status
