"""The HTTP server around the app, and starting it (`start_server`: the CLI, the demo and tests
call it). Requests aiohttp refuses before any handler runs (a header line too long, malformed
chunking, conflicting lengths) still get a JSON-RPC error body, and never an echo of what the
client sent."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proxy.config import ProxyConfig
from proxy.http.keys import METRICS_LISTENER
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


async def start_server(config: ProxyConfig) -> tuple[ProxyRunner, int]:
    """Start serving `config` (and its metrics listener); returns the runner and the bound port."""
    from proxy.app import create_app  # (the app's modules import this one's neighbours)

    app = create_app(config)
    runner = ProxyRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=config.listen.shutdown_grace_seconds,  # (a drain shortens it: ops/drain.py)
        access_log=None,
    )
    await runner.setup()
    site = web.TCPSite(runner, config.listen.host, config.listen.port, reuse_address=True)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    port = sockets[0].getsockname()[1] if sockets else config.listen.port
    try:
        await app[METRICS_LISTENER].start(app)
    except BaseException:
        await runner.cleanup()
        raise
    return runner, port
