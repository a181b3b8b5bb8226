"""A small MCP client for `verify` and `policy suggest`, in both protocol eras, over any Upstream.

`verify` reaches the proxy as a tenant (an HttpUpstream whose one header is the tenant's bearer
token); `policy suggest` reaches a tenant's upstream directly, through the proxy's own HttpUpstream
or StdioUpstream with the tenant's configured credentials. Either way one client speaks only what
these commands need: discovery (`server/discover`, else `initialize`), lists with paging, calls,
and the handshake era's session. It offers the server no client capabilities; a server's request
to it anyway is answered with an error, so no call waits for an answer that never comes.

Every answer is kept whole (`Reply.text`): the probes look for canaries in all of it, notifications
and error messages included.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Final

from proxy import __version__
from proxy.config import UpstreamConfig
from proxy.protocol.errors import ProxyError, UpstreamTimeout
from proxy.protocol.headers import (
    CLIENT_CAPABILITIES_META,
    METHOD_HEADER,
    NAME_HEADER,
    PROTOCOL_VERSION_HEADER,
    PROTOCOL_VERSION_META,
    encode_header_value,
    param_headers_of,
    render_param_headers,
)
from proxy.types import LATEST_MODERN_VERSION, Era, JsonObject
from proxy.upstreams.base import Upstream, UpstreamRequest, incoming
from proxy.upstreams.http import HttpUpstream

HANDSHAKE_VERSION: Final = "2025-11-25"
SESSION_HEADER: Final = "Mcp-Session-Id"
CLIENT_INFO: Final = {"name": "mcp-tenant-proxy-verify", "version": __version__}
_NAME_KEYS: Final = {
    "tools/call": "name",
    "prompts/get": "name",
    "resources/read": "uri",
    "tasks/get": "taskId",
}
_ACCEPT: Final = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
MAX_PAGES: Final = 50


class VerifyError(Exception):
    """The command could not run (exit 2): the message says why, in one line."""


@dataclass
class Reply:
    """One HTTP exchange: its status, every message that came back, and the answer among them."""

    status: int
    messages: list[JsonObject] = field(default_factory=list)
    answer: JsonObject | None = None
    session_id: str | None = None

    @property
    def result(self) -> JsonObject | None:
        result = self.answer.get("result") if self.answer is not None else None
        return result if isinstance(result, dict) else None

    @property
    def error(self) -> JsonObject | None:
        error = self.answer.get("error") if self.answer is not None else None
        return error if isinstance(error, dict) else None

    @property
    def ok(self) -> bool:
        """A result, and not a tool's own error result."""
        return self.result is not None and self.result.get("isError") is not True

    @property
    def text(self) -> str:
        return "\n".join(json.dumps(m, ensure_ascii=False) for m in self.messages)

    def describe(self) -> str:
        """What came back, in a few words, for evidence."""
        if self.error is not None:
            return f"HTTP {self.status}, JSON-RPC error {self.error.get('code')}: {self.error.get('message')}"
        if self.result is not None:
            return f"HTTP {self.status}, {'an error result' if not self.ok else 'a result'}"
        return f"HTTP {self.status}, no answer"


def proxy_transport(url: str, token: str, timeout: float) -> HttpUpstream:
    """The proxy, reached as one tenant: the token is the only header the client adds."""
    config = UpstreamConfig(
        url=url,
        headers={"Authorization": f"Bearer {token}"},
        connect_timeout_seconds=timeout,
        read_timeout_seconds=timeout,
        max_connections=8,
    )
    return HttpUpstream("verify", config)


class McpClient:
    """One MCP client over one transport; `label` names it in errors (a tenant, an upstream)."""

    def __init__(self, transport: Upstream, label: str, timeout: float = 30.0) -> None:
        self.transport = transport
        self.label = label
        self.timeout = timeout
        self.era: Era | None = None
        self.version = LATEST_MODERN_VERSION
        self.session_id: str | None = None
        self.server_capabilities: JsonObject = {}
        self.tool_schemas: dict[str, JsonObject] = {}
        self._ids = itertools.count(1)

    # --- connecting -------------------------------------------------------------------------

    async def connect(self, era: Era | None = None) -> None:
        """The modern era when the server speaks it (or `era` says so), else the handshake era."""
        if era is not Era.HANDSHAKE:
            self.era = Era.MODERN
            reply = await self.request("server/discover", {})
            self._refuse_auth(reply)
            versions = reply.result.get("supportedVersions") if reply.result else None
            if isinstance(versions, list) and LATEST_MODERN_VERSION in versions:
                capabilities = reply.result.get("capabilities") if reply.result else None
                self.server_capabilities = capabilities if isinstance(capabilities, dict) else {}
                return
            if era is Era.MODERN:
                raise VerifyError(f"{self.label}: server/discover failed ({reply.describe()})")
        await self.initialize()

    async def initialize(self) -> None:
        """The handshake: initialize, then notifications/initialized on the new session."""
        self.era, self.session_id = Era.HANDSHAKE, None
        params = {"protocolVersion": HANDSHAKE_VERSION, "capabilities": {}, "clientInfo": CLIENT_INFO}
        reply = await self.request("initialize", params)
        self._refuse_auth(reply)
        if reply.result is None:
            raise VerifyError(
                f"{self.label}: neither server/discover nor initialize worked ({reply.describe()})"
            )
        version = reply.result.get("protocolVersion")
        self.version = version if isinstance(version, str) else HANDSHAKE_VERSION
        capabilities = reply.result.get("capabilities")
        self.server_capabilities = capabilities if isinstance(capabilities, dict) else {}
        self.session_id = reply.session_id
        await self.notify("notifications/initialized")

    def _refuse_auth(self, reply: Reply) -> None:
        if reply.status in (401, 403):
            why = reply.error.get("message") if reply.error else "no reason given"
            raise VerifyError(f"{self.label}: refused with HTTP {reply.status} ({why})")

    async def close(self) -> None:
        """End the handshake session (if any) and the transport."""
        if self.session_id is not None:
            with contextlib.suppress(VerifyError):  # a session the server already forgot
                await self.delete(self.session_id)
            self.session_id = None
        await self.transport.close()

    # --- requests ---------------------------------------------------------------------------

    def _headers(self, method: str, params: JsonObject, session_id: str | None) -> dict[str, str]:
        headers = dict(_ACCEPT)
        if self.era is Era.MODERN:
            headers[PROTOCOL_VERSION_HEADER] = self.version
            headers[METHOD_HEADER] = method
            name = params.get(_NAME_KEYS.get(method, ""))
            if isinstance(name, str):
                headers[NAME_HEADER] = encode_header_value(name)
            schema = self.tool_schemas.get(str(params.get("name"))) if method == "tools/call" else None
            annotations = param_headers_of(schema) if schema is not None else None
            arguments = params.get("arguments")
            if annotations and isinstance(arguments, dict):
                headers.update(render_param_headers(annotations, arguments))
        elif method != "initialize":
            headers[PROTOCOL_VERSION_HEADER] = self.version
        if session_id is not None:
            headers[SESSION_HEADER] = session_id
        return headers

    def _envelope(self, params: JsonObject, capabilities: JsonObject | None) -> JsonObject:
        if self.era is not Era.MODERN:
            return params
        meta = dict(params.get("_meta") or {})
        meta.update(
            {
                PROTOCOL_VERSION_META: self.version,
                CLIENT_CAPABILITIES_META: capabilities or {},
                "io.modelcontextprotocol/clientInfo": CLIENT_INFO,
            }
        )
        return {**params, "_meta": meta}

    async def request(
        self,
        method: str,
        params: JsonObject | None = None,
        *,
        as_session: str | None = None,
        capabilities: JsonObject | None = None,
    ) -> Reply:
        """One request and everything that came back; `as_session`: sent with this session id
        instead of the client's own (another client's, for the replay probes)."""
        session = as_session or self.session_id
        request_id = next(self._ids)
        params = self._envelope(params or {}, capabilities)
        body = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        headers = self._headers(method, params, session)
        return await self._exchange(UpstreamRequest("POST", headers, json.dumps(body).encode()), request_id)

    async def notify(self, method: str, params: JsonObject | None = None) -> int:
        body = {"jsonrpc": "2.0", "method": method, "params": self._envelope(params or {}, None)}
        headers = self._headers(method, {}, self.session_id)
        reply = await self._exchange(UpstreamRequest("POST", headers, json.dumps(body).encode()), None)
        return reply.status

    async def get_stream(self, session_id: str) -> int:
        """The status a GET for `session_id`'s stream gets (the stream itself is closed at once)."""
        headers = {"Accept": "text/event-stream", SESSION_HEADER: session_id}
        headers[PROTOCOL_VERSION_HEADER] = self.version
        return await self._status_of(UpstreamRequest("GET", headers))

    async def delete(self, session_id: str) -> int:
        headers = {SESSION_HEADER: session_id, PROTOCOL_VERSION_HEADER: self.version}
        return await self._status_of(UpstreamRequest("DELETE", headers))

    async def _status_of(self, request: UpstreamRequest) -> int:
        try:
            async with asyncio.timeout(self.timeout):
                response = await self.transport.send(request)
                response.close()
                return response.status
        except (ProxyError, TimeoutError) as exc:
            raise VerifyError(f"{self.label}: {request.http_method} failed: {_why(exc)}") from None

    async def _exchange(self, request: UpstreamRequest, request_id: int | None) -> Reply:
        try:
            async with asyncio.timeout(self.timeout):
                response = await self.transport.send(request)
                try:
                    reply = Reply(response.status, session_id=response.session_id)
                    if response.status == 202 or request_id is None:
                        return reply
                    await self._read(response, request_id, reply)
                    return reply
                finally:
                    response.close()
        except (ProxyError, TimeoutError) as exc:
            raise VerifyError(f"{self.label}: {_why(exc)}") from None

    async def _read(self, response: Any, request_id: int, reply: Reply) -> None:
        try:
            async for batch in incoming(response):
                for item in batch:
                    message = item.message
                    if message is None:
                        continue
                    reply.messages.append(message)
                    if "method" in message and "id" in message:
                        await self._decline(message)
                    elif "method" not in message and message.get("id") == request_id:
                        reply.answer = message
                        return
        except ProxyError:
            if not reply.messages and response.status >= 400:
                return  # an HTTP error without a JSON-RPC body: the status says it all
            raise

    async def _decline(self, server_request: JsonObject) -> None:
        """A server's request to this client: refused, so the call it belongs to goes on."""
        error = {"code": -32601, "message": "mcp-tenant-proxy verify offers no client capabilities"}
        body = {"jsonrpc": "2.0", "id": server_request["id"], "error": error}
        headers = self._headers("", {}, self.session_id)
        headers.pop(METHOD_HEADER, None)
        response = await self.transport.send(UpstreamRequest("POST", headers, json.dumps(body).encode()))
        response.close()

    # --- what the server offers ---------------------------------------------------------------

    async def list_all(self, method: str, key: str) -> list[JsonObject]:
        """Every item of a list method, all pages; [] when the server does not offer the method."""
        items: list[JsonObject] = []
        cursor: str | None = None
        for _ in range(MAX_PAGES):
            reply = await self.request(method, {} if cursor is None else {"cursor": cursor})
            if reply.result is None:
                if reply.error is not None and reply.error.get("code") in (-32601, -32602):
                    return items
                raise VerifyError(f"{self.label}: {method} failed ({reply.describe()})")
            page = reply.result.get(key)
            if isinstance(page, list):
                items.extend(item for item in page if isinstance(item, dict))
            next_cursor = reply.result.get("nextCursor")
            if not isinstance(next_cursor, str) or not next_cursor:
                break
            cursor = next_cursor
        if method == "tools/list":
            for tool in items:
                schema = tool.get("inputSchema")
                if isinstance(tool.get("name"), str) and isinstance(schema, dict):
                    self.tool_schemas[tool["name"]] = schema
        return items


def _why(exc: BaseException) -> str:
    """The transport's error as this client's: it may be the proxy, not an upstream, that failed."""
    if isinstance(exc, TimeoutError | UpstreamTimeout):
        return "no answer in time"
    text = str(exc).removeprefix("The upstream MCP server ").rstrip(".")
    cause = exc.__cause__
    detail = f" ({cause})" if cause is not None and str(cause) else ""
    return f"the server {text}{detail}"
