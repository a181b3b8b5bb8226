"""The HTTP server around the app: requests aiohttp refuses before any handler runs (a header line
too long, malformed chunking, conflicting lengths) still get a JSON-RPC error body, and never an
echo of what the client sent."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proxy.protocol.jsonrpc import dumps, error_body


class JsonErrorRequestHandler(RequestHandler):
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            text = "Internal proxy error"
        elif isinstance(exc, LineTooLong):
            status, text = 431, "Request header fields too large"
        elif isinstance(exc, BadHttpMessage):
            text = "Bad request: the HTTP message is malformed"
        else:
            text = "Bad request"
        self.log_debug("refused a malformed request", exc_info=exc)
        code = -32603 if status >= 500 else -32600
        response = web.Response(
            status=status, body=dumps(error_body(None, code, text)), content_type="application/json"
        )
        response.force_close()
        return response


class JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class ProxyRunner(web.AppRunner):
    """AppRunner whose connections answer protocol-level errors with JSON-RPC errors."""

    async def _make_server(self) -> web.Server:
        server: Any = await super()._make_server()
        server.__class__ = JsonErrorServer  # the same object; only how it makes handlers differs
        return server  # type: ignore[no-any-return]

    def limit_shutdown(self, seconds: float) -> None:
        """How long cleanup() gives connections still busy (aiohttp takes it only when constructed):
        after a drain they have had their grace already (ops/drain.py)."""
        self._shutdown_timeout = seconds
