"""`mcp-tenant-proxy demo`: three tenants, real SDK upstreams, the proxy, the real SDK client.

acme and globex each have an SDK notes server over streamable HTTP (in this process, on free
loopback ports); initech has the same server over stdio, run by the proxy as its own process.
Nothing is read from disk or the network.
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


@contextlib.asynccontextmanager
async def serve_upstream(tenant: str, canary: str, port: int) -> AsyncIterator[str]:
    """One tenant's SDK notes server on loopback, for as long as the context lasts."""
    import uvicorn

    from proxy.demo_upstream import build_notes_server

    app = build_notes_server(tenant, canary).streamable_http_app(host="127.0.0.1")
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        server.should_exit = True
        await task


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
    from proxy.cli import start_server
    from proxy.config import ProxyConfig
    from proxy.http.keys import SERVICES
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
        upstreams = {}
        for tenant in HTTP_TENANTS:
            upstreams[tenant] = await stack.enter_async_context(
                serve_upstream(tenant, canaries[tenant], free_port())
            )
        work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mcp-proxy-demo-")))
        proxy_port = free_port()
        config = ProxyConfig.model_validate(demo_config(proxy_port, upstreams, canaries, work_dir))
        runner, _ = await start_server(config)
        stack.push_async_callback(runner.cleanup)
        url = config.listen.resource_url
        print(f"proxy on {url}; upstreams: " + ", ".join(f"{t} -> {u}" for t, u in upstreams.items()))
        print(f"{STDIO_TENANT} -> a stdio process the proxy runs for it alone")

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
                        check(who["pid"] != os.getpid(), "served by its own stdio process")
                        continue
                    headers = json.loads(_text(await client.call_tool("request_headers", {})))["headers"]
                    check(tokens[tenant] not in json.dumps(headers), "its token never reached the upstream")
                    check(
                        headers.get("authorization") == f"Bearer upstream-{tenant}",
                        "the upstream got the tenant's own credentials",
                    )

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
