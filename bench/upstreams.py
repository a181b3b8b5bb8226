"""The benchmark's upstream servers, each run as its own process (`python -m bench.upstreams ...`).

    sdk PORT [--cache-hints]   the official SDK's MCPServer under uvicorn: a `lookup` tool (the tenant
                               argument it trusts), `whoami`, and `progress` (n progress
                               notifications, then the answer)
    forwarder PORT URL         a bare aiohttp forwarder to URL (the floor of an aiohttp-based proxy)
    streams-forwarder PORT URL the same aiohttp server relaying with a minimal asyncio-streams HTTP/1.1
                               client instead of aiohttp's ClientSession: a reference for what the
                               client costs, not a client to ship (Content-Length bodies only, no
                               chunked or SSE answers, no timeouts, no error handling)
    static PORT                a static JSON-RPC responder (aiohttp's low-level server, no routing): a
                               fixed result per method with the request's id echoed; `initialize`
                               gets a fresh Mcp-Session-Id; tools/call of `stream_events` answers with
                               an SSE stream of `n` progress notifications and then the result

Both print `ready` on stdout once they accept connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
from typing import Any

LOOKUP_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "tenant_id": {"type": "string", "description": "The organisation to look in"},
        "key": {"type": "string"},
    },
    "required": ["tenant_id", "key"],
}
STREAM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"n": {"type": "integer"}, "tenant_id": {"type": "string"}},
    "required": ["n"],
}
STATIC_TOOLS = [
    {"name": "lookup", "description": "Look a key up", "inputSchema": LOOKUP_SCHEMA},
    {"name": "whoami", "description": "Who answered", "inputSchema": {"type": "object", "properties": {}}},
    {
        "name": "stream_events",
        "description": "n progress events, then the answer",
        "inputSchema": STREAM_SCHEMA,
    },
]


# --- the static responder ---------------------------------------------------------------------

_JSON = "application/json"


def _answer(request_id: Any, result: dict[str, Any]) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "result": result}, separators=(",", ":")).encode()


_RESULTS: dict[str, dict[str, Any]] = {
    "tools/list": {"tools": STATIC_TOOLS},
    "tools/call": {
        "content": [{"type": "text", "text": '{"value":"value-of-k1","found":true}'}],
        "structuredContent": {"value": "value-of-k1", "found": True},
        "isError": False,
    },
}


def _initialize_result(params: dict[str, Any]) -> dict[str, Any]:
    return {
        "protocolVersion": params.get("protocolVersion", "2025-11-25"),
        "capabilities": {"tools": {"listChanged": False}},
        "serverInfo": {"name": "bench-static", "version": "1"},
    }


async def run_static(port: int) -> None:
    from aiohttp import web

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "DELETE":
            return web.Response(status=200)
        if request.method != "POST":
            return web.Response(status=405)
        message = json.loads(await request.read())
        request_id = message.get("id")
        if request_id is None:  # a notification
            return web.Response(status=202)
        method = message.get("method")
        params = message.get("params") or {}
        if method == "initialize":
            headers = {"Mcp-Session-Id": secrets.token_hex(16)}
            return web.Response(
                body=_answer(request_id, _initialize_result(params)), content_type=_JSON, headers=headers
            )
        if method == "tools/call" and params.get("name") == "stream_events":
            return await _stream_events(request, request_id, params)
        result = _RESULTS.get(method or "", {})
        if params.get("_meta") is not None:  # the modern era: every result says it is complete
            result = {**result, "resultType": "complete"}
        return web.Response(body=_answer(request_id, result), content_type=_JSON)

    async def _stream_events(request: web.BaseRequest, request_id: Any, params: dict[str, Any]) -> Any:
        arguments = params.get("arguments") or {}
        n = int(arguments.get("n", 100))
        token = ((params.get("_meta") or {}).get("progressToken")) or "bench"
        stream = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        await stream.prepare(request)
        # The first event goes out alone (time to first event), the rest in batches of 64 events.
        batch: list[bytes] = []
        for step in range(1, n + 1):
            note = {
                "jsonrpc": "2.0",
                "method": "notifications/progress",
                "params": {"progressToken": token, "progress": step, "total": n},
            }
            batch.append(
                b"event: message\ndata: " + json.dumps(note, separators=(",", ":")).encode() + b"\n\n"
            )
            if step == 1 or len(batch) >= 64:
                await stream.write(b"".join(batch))
                batch.clear()
        done = {"content": [{"type": "text", "text": f"{n} events"}], "isError": False}
        if params.get("_meta") is not None:
            done["resultType"] = "complete"
        batch.append(b"event: message\ndata: " + _answer(request_id, done) + b"\n\n")
        await stream.write(b"".join(batch))
        await stream.write_eof()
        return stream

    await _serve(handle, port)


async def _serve(handle: Any, port: int) -> None:
    """aiohttp's low-level server on loopback (no routing, no access log) until killed."""
    from aiohttp import web

    server = web.Server(handle, access_log=None)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(server, "127.0.0.1", port, reuse_address=True, backlog=4096)
    print("ready", flush=True)
    async with listener:
        await listener.serve_forever()


# --- the bare forwarder ------------------------------------------------------------------------


async def run_forwarder(port: int, target: str) -> None:
    """The floor for any aiohttp-based proxy: an aiohttp server relaying each POST body to `target`
    with one pooled aiohttp client and returning the answer; no auth, parsing, policy or audit."""
    import aiohttp
    import yarl
    from aiohttp import web

    url = yarl.URL(target)
    client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100, keepalive_timeout=4))
    passed = ("Content-Type", "Accept", "MCP-Protocol-Version", "Mcp-Method", "Mcp-Name", "Mcp-Session-Id")

    async def handle(request: web.BaseRequest) -> web.Response:
        body = await request.read()
        headers = {name: request.headers[name] for name in passed if name in request.headers}
        async with client.post(url, data=body, headers=headers) as answer:
            payload = await answer.read()
            content_type = answer.headers.get("Content-Type", _JSON)
            return web.Response(status=answer.status, body=payload, headers={"Content-Type": content_type})

    await _serve(handle, port)


async def run_streams_forwarder(port: int, target: str) -> None:
    """The bare forwarder with aiohttp's ClientSession swapped for asyncio streams: kept-alive
    connections in a pool, the request head written by hand, `readuntil` for the answer's head and
    `readexactly` for its Content-Length body. Enough for the static responder's answers."""
    import yarl
    from aiohttp import web

    url = yarl.URL(target)
    host, upstream_port, path = url.host or "127.0.0.1", url.port or 80, url.raw_path
    passed = ("Content-Type", "Accept", "MCP-Protocol-Version", "Mcp-Method", "Mcp-Name", "Mcp-Session-Id")
    pool: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def handle(request: web.BaseRequest) -> web.Response:
        body = await request.read()
        reader, writer = pool.pop() if pool else await asyncio.open_connection(host, upstream_port)
        head = [f"POST {path} HTTP/1.1", f"Host: {host}:{upstream_port}", f"Content-Length: {len(body)}"]
        head += [f"{name}: {request.headers[name]}" for name in passed if name in request.headers]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {
            name.lower(): value for name, _, value in (line.partition(": ") for line in lines[1:] if line)
        }
        payload = await reader.readexactly(int(headers.get("content-length", "0")))
        pool.append((reader, writer))
        content_type = headers.get("content-type", _JSON)
        return web.Response(status=status, body=payload, headers={"Content-Type": content_type})

    await _serve(handle, port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstreams")
    parser.add_argument("kind", choices=["sdk", "static", "forwarder", "streams-forwarder"])
    parser.add_argument("port", type=int)
    parser.add_argument("target", nargs="?", help="forwarder: the upstream URL to relay to")
    parser.add_argument("--cache-hints", action="store_true", help="sdk: tools/list carries ttlMs (public)")
    args = parser.parse_args(argv)
    if args.kind == "sdk":
        from bench.sdk_upstream import run_sdk

        run_sdk(args.port, args.cache_hints)
    elif args.kind == "forwarder":
        import uvloop

        uvloop.run(run_forwarder(args.port, args.target))
    elif args.kind == "streams-forwarder":
        import uvloop

        uvloop.run(run_streams_forwarder(args.port, args.target))
    else:
        import uvloop

        uvloop.run(run_static(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
