"""A lean HTTP/1.1 client for the upstream path: one connection pool per tenant.

aiohttp's ClientSession does far more per request than the proxy needs (middlewares, cookie jar,
tracing, redirects, auth, proxies): about half of what a bare forwarder costs. This client keeps
only what an upstream exchange uses: kept-alive connections, a connection limit, connect and read
timeouts, TLS, and answers parsed by aiohttp's own HTTP parser (llhttp, in C) into aiohttp's
StreamReader, so bodies (Content-Length, chunked, to the connection's end; gzip or deflate) are
passed on as they arrive and SSE streams are never buffered whole. It never follows redirects
and keeps no cookies: it sends exactly the headers it is given, plus Host and Content-Length.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ssl
from collections.abc import Mapping

import yarl
from aiohttp import StreamReader
from aiohttp.http import RawResponseMessage

from proxy.upstreams.http_connection import Disconnected, HttpClientError, HttpConnection

__all__ = ["ConnectionPool", "HttpClientError", "HttpResponse", "default_ssl_context"]

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


@functools.cache
def default_ssl_context() -> ssl.SSLContext:
    """Certificates and host names verified against the system's CAs; built once (it is slow)."""
    return ssl.create_default_context()


class HttpResponse:
    """An answer's head, and its body (`content`) as it arrives. `release()` once done with it."""

    __slots__ = ("_connection", "_pool", "content", "headers", "status")

    def __init__(
        self,
        pool: ConnectionPool,
        connection: HttpConnection,
        message: RawResponseMessage,
        body: StreamReader,
    ) -> None:
        self._pool = pool
        self._connection: HttpConnection | None = connection
        self.status = message.code
        self.headers = message.headers
        self.content = body

    @property
    def content_type(self) -> str:
        """The media type, lower-cased and without parameters (aiohttp's default when absent)."""
        value = self.headers.get("Content-Type")
        return "application/octet-stream" if value is None else value.partition(";")[0].strip().lower()

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    def release(self) -> None:
        """A fully received answer gives its connection back to the pool; any other closes it."""
        connection, self._connection = self._connection, None
        if connection is not None:
            self._pool.release(connection)


class ConnectionPool:
    """Kept-alive connections to one origin, at most `max_connections` in use at once.

    Idle connections are reused newest first and closed once idle for `keepalive_seconds`. The
    connect timeout bounds waiting for a free slot and connecting together (aiohttp's `connect`);
    the read timeout bounds every wait for the server, for the answer's head and for each read.
    """

    def __init__(
        self,
        url: str,
        *,
        max_connections: int,
        keepalive_seconds: float,
        connect_timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parsed = yarl.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.raw_host or parsed.port is None:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self._host = parsed.raw_host
        self._port = parsed.port
        self._ssl = (ssl_context or default_ssl_context()) if parsed.scheme == "https" else None
        host = parsed.host_port_subcomponent  # the port only when not the scheme's default
        self._request_line_tail = f" {parsed.raw_path_qs} HTTP/1.1\r\nHost: {host}\r\n"
        self._keepalive = keepalive_seconds
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max = max_connections
        self._free = max_connections  # slots not in use (a connection in use, or being opened)
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._idle: list[HttpConnection] = []  # oldest first
        self._open: set[HttpConnection] = set()
        self._expiry: asyncio.TimerHandle | None = None

    @property
    def in_use(self) -> int:
        """Connections handed out (or being opened) and not yet released: what a leak would grow."""
        return self._max - self._free

    @property
    def idle(self) -> int:
        """Connections kept alive for the next request (some may have expired unnoticed)."""
        return len(self._idle)

    async def request(
        self, method: str, headers: Mapping[str, str], body: bytes | None = None
    ) -> HttpResponse:
        """Send one request and return once its answer's head is in. Raises TimeoutError, or
        HttpClientError when no answer can be had."""
        data = self._encode(method, headers, body)
        retry = method in IDEMPOTENT_METHODS
        while True:
            connection, reused = await self._acquire()
            try:
                message, payload = await connection.send(data)
            except Disconnected:
                self.release(connection)
                if not (reused and retry):
                    raise
                retry = False
                continue
            except BaseException:
                connection.close()  # the answer (if any) is unread: the connection cannot be reused
                self.release(connection)
                raise
            return HttpResponse(self, connection, message, payload)

    def _encode(self, method: str, headers: Mapping[str, str], body: bytes | None) -> bytes:
        fields = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        # Every line break in `fields` must be one written just above: a CR, LF or NUL inside a
        # name or value would end the header early (header injection), as aiohttp refuses too.
        if fields.count("\n") != len(headers) or fields.count("\r") != len(headers) or "\x00" in fields:
            raise ValueError("a header name or value holds a line break or NUL")
        if body is None and method not in ("POST", "PUT", "PATCH"):
            return f"{method}{self._request_line_tail}{fields}\r\n".encode()
        body = body or b""
        return f"{method}{self._request_line_tail}{fields}Content-Length: {len(body)}\r\n\r\n".encode() + body

    async def _acquire(self) -> tuple[HttpConnection, bool]:
        """A connection to send on, and whether it was kept alive from an earlier request."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            connection = self._pop_idle()
            if connection is not None:
                return connection, True
            waited = False
        else:
            waited = True
        async with asyncio.timeout(self._connect_timeout):
            if waited:
                await self._wait_for_slot()
                connection = self._pop_idle()
                if connection is not None:
                    return connection, True
            try:
                return await self._connect(), False
            except BaseException:
                self._release_slot()
                raise

    async def _wait_for_slot(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release_slot()  # handed a slot just as the wait ended: pass it on
            raise

    async def _connect(self) -> HttpConnection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await loop.create_connection(
                lambda: HttpConnection(loop, self._read_timeout),
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl is not None else None,
            )
        except OSError as exc:
            raise HttpClientError("Cannot connect") from exc
        self._open.add(connection)
        return connection

    def _pop_idle(self) -> HttpConnection | None:
        if not self._idle:
            return None
        fresh_since = asyncio.get_running_loop().time() - self._keepalive
        while self._idle:
            connection = self._idle.pop()
            if connection.idle_since > fresh_since and connection.transport is not None:
                return connection
            self._discard(connection)
        return None

    def release(self, connection: HttpConnection) -> None:
        """The exchange on `connection` is over: keep the connection for the next one, or close it."""
        if connection in self._open and connection.idle():
            loop = asyncio.get_running_loop()
            connection.idle_since = loop.time()
            self._idle.append(connection)
            if self._expiry is None:
                self._expiry = loop.call_at(connection.idle_since + self._keepalive, self._expire)
        else:
            self._discard(connection)
        self._release_slot()

    def _release_slot(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the longest waiting request
                return
        self._free += 1

    def _discard(self, connection: HttpConnection) -> None:
        connection.close()
        self._open.discard(connection)

    def _expire(self) -> None:
        self._expiry = None
        loop = asyncio.get_running_loop()
        stale_before = loop.time() - self._keepalive
        stale = 0
        while stale < len(self._idle) and self._idle[stale].idle_since <= stale_before:
            self._discard(self._idle[stale])
            stale += 1
        del self._idle[:stale]
        if self._idle:
            self._expiry = loop.call_at(self._idle[0].idle_since + self._keepalive, self._expire)

    async def close(self) -> None:
        """Close every connection, in use or idle; answers being read end with an error. The
        pool itself stays usable (a later request opens a new connection)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for connection in self._open:
            connection.close()
        self._open.clear()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports finish closing before the loop moves on
