"""One HTTP/1.1 connection to an upstream, as an asyncio protocol (the pool is upstreams/http_client.py).

It writes requests it is given as bytes and parses answers with aiohttp's own HTTP parser (llhttp,
in C) into aiohttp's StreamReader, which passes a body (Content-Length, chunked or to the
connection's end; gzip or deflate decoded) on as it arrives, pausing the socket when the reader
falls behind. The connection knows when its answer ended and whether it may carry another request.
"""

from __future__ import annotations

import asyncio

from aiohttp import StreamReader
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpResponseParser, RawResponseMessage

READ_BUFSIZE = 2**16  # as aiohttp's client: reading pauses above twice this much unread


class HttpClientError(Exception):
    """The exchange failed: the connection broke, or the server's answer is not HTTP/1.1."""


class Disconnected(HttpClientError):
    """The server closed the connection before its answer's head: an idempotent request may be
    sent again on a fresh connection (a kept-alive one can be closed by the server at any time)."""


class HttpConnection(BaseProtocol):
    """One connection: writes a request, parses its answer.

    Each exchange gets its own parser (aiohttp's client does the same; it costs far less than
    parsing), dropped with the answer's body once the connection is idle: an idle connection holds
    nothing of the answers it carried. The read timeout is one timer per connection, re-armed
    lazily from the time of the last read, not one timer per read.
    """

    __slots__ = (
        "_head", "_http", "_last_read", "_payload", "_read_timeout", "_reusable", "_timer", "idle_since",
    )  # fmt: skip

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        super().__init__(loop)
        self._read_timeout = read_timeout
        self._http: HttpResponseParser | None = None
        self._head: asyncio.Future[tuple[RawResponseMessage, StreamReader]] | None = None
        self._payload: StreamReader | None = None
        self._reusable = True
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.idle_since = 0.0

    def send(self, data: bytes) -> asyncio.Future[tuple[RawResponseMessage, StreamReader]]:
        """Write one request; the future is its answer's head and body stream."""
        if self.transport is None or self.transport.is_closing():
            raise Disconnected("The connection is closed")
        loop = self._loop
        # BaseProtocol pauses `_parser` under back-pressure, so both names refer to it.
        self._http = self._parser = HttpResponseParser(
            self, loop, READ_BUFSIZE, payload_exception=HttpClientError, read_until_eof=True
        )
        head = self._head = loop.create_future()
        self._last_read = loop.time()
        if self._timer is None:
            self._timer = loop.call_at(self._last_read + self._read_timeout, self._check_timeout)
        self.transport.write(data)
        return head

    def idle(self) -> bool:
        """True, letting go of the finished exchange, when another request may go out here: its
        answer arrived to its end and nothing (the server's `Connection: close`, an error, a closed
        transport) rules the connection out."""
        payload = self._payload
        if not (
            self._reusable
            and self._head is None
            and payload is not None
            and payload.is_eof()
            and payload.exception() is None
            and self.transport is not None
            and not self.transport.is_closing()
        ):
            return False
        self._http = self._parser = None
        self._payload = None
        return True

    def close(self) -> None:
        self._reusable = False
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if data:
            self._last_read = self._loop.time()
        if self._http is None:  # bytes on an idle connection: nothing more here can be trusted
            self._fail(HttpClientError("The server sent data no request asked for"))
            return
        try:
            messages, _, _ = self._http.feed_data(data)
        except Exception:
            self._fail(HttpClientError("The server's answer is not valid HTTP/1.1"))
            return
        for message, payload in messages:
            if 100 <= message.code < 200 and message.code != 101:
                continue  # an interim answer (100 Continue, 103 Early Hints): the final one follows
            head, self._head = self._head, None
            if head is None:  # a second answer to one request
                self._fail(HttpClientError("The server answered a request that was not sent"))
                return
            self._payload = payload
            if message.should_close or message.upgrade:
                self._reusable = False
            if not head.done():
                head.set_result((message, payload))

    def resume_reading(self, resume_parser: bool = True) -> None:
        # StreamReader calls this after every read below its low-water mark; only a real pause
        # has anything to resume (the parser holds data back only while paused).
        if self._reading_paused:
            self._last_read = self._loop.time()  # the wait was ours, not the server's
            super().resume_reading(resume_parser)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._reusable = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        payload = self._payload
        if payload is not None and not payload.is_eof() and self._http is not None:
            try:
                self._http.feed_eof()  # ends a body that runs to the connection's end
            except Exception:
                self._fail(HttpClientError("The connection closed before the answer was complete"))
                return
            if self._reading_paused:
                return  # decoded data is still held by the paused parser: the body ends as it is read
        self._fail(Disconnected("The connection closed before the answer was complete"))

    def _fail(self, exc: BaseException) -> None:
        """End the exchange under way with `exc` (for whoever awaits its head or reads its body)."""
        self._reusable = False
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(exc)
        payload = self._payload
        if payload is not None and not payload.is_eof() and payload.exception() is None:
            payload.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def _check_timeout(self) -> None:
        self._timer = None
        payload = self._payload
        if self._head is None and (payload is None or payload.is_eof()):
            return  # no answer awaited: the next request arms the timer again
        now = self._loop.time()
        if self._reading_paused:
            deadline = now + self._read_timeout  # our reader is behind, not the server
        else:
            deadline = self._last_read + self._read_timeout
            if deadline <= now:
                self._fail(TimeoutError())
                return
        self._timer = self._loop.call_at(deadline, self._check_timeout)
