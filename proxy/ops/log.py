"""structlog setup: JSON lines on stderr (console rendering when stderr is a terminal, or with
`run --log-format console`).

Values in log lines may be a client's (a method name, a header): `SafeValues` bounds every string
value before any line is written (for JSON lines, folded into their renderer: `BoundedJSONLines`),
and for the console escapes what a terminal would act on (C0 and C1 controls, ESC, DEL, line and
paragraph separators) and anything beyond ASCII (lookalikes of `=` or of spaces), so no value can
move the cursor, set the window title or forge a line. JSON lines escape those themselves
(ascii_json: pure ASCII).

JSON lines are rendered by orjson and written as bytes, gathered per event-loop turn: one write
for every line of a turn instead of one system call per line (structlog's own loggers flush each
line, which cost about a tenth of the proxy's CPU per request). Outside a running loop, and at
exit, lines are written at once.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import sys
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, BinaryIO

import orjson
import structlog

from proxy.http.keys import CLIENT_REQUEST_ID, REQUEST_ID

if TYPE_CHECKING:
    from proxy.flow import Exchange


class BatchedBytesLogger:
    """A structlog logger for rendered bytes; lines of one loop turn leave in one write."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._lines: list[bytes] = []
        self._scheduled = False

    def msg(self, message: bytes) -> None:
        self._lines.append(message + b"\n")
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg

    def flush(self) -> None:
        self._scheduled = False
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines.clear()
        try:
            self._file.write(data)
            self._file.flush()
        except (OSError, ValueError):  # stderr closed or gone: logging never takes the proxy down
            pass


class _BatchedBytesLoggerFactory:
    def __init__(self, file: BinaryIO) -> None:
        self._logger = BatchedBytesLogger(file)
        atexit.register(self._logger.flush)

    def __call__(self, *args: Any) -> BatchedBytesLogger:
        return self._logger


MAX_VALUE_CHARS = 1024  # a longer string value is cut (JSON and console alike)
MAX_EXCEPTION_CHARS = 20_000  # a traceback keeps its lines (escaped otherwise), up to this


def _escape_char(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class SafeValues:
    """A structlog processor: every string value bounded in length; for the console also escaped to
    printable ASCII (a traceback keeps its line breaks, it is the proxy's own)."""

    def __init__(self, escape: bool) -> None:
        self.escape = escape

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in event.items():
            if not isinstance(value, str):
                continue  # (the console renders other values with repr: escaped already)
            limit = MAX_EXCEPTION_CHARS if key == "exception" else MAX_VALUE_CHARS
            fine = len(value) <= limit and (not self.escape or (value.isascii() and value.isprintable()))
            if not fine:
                event[key] = self._safe(value, limit, keep_lines=key == "exception")
        return event

    def _safe(self, value: str, limit: int, keep_lines: bool) -> str:
        cut = value[:limit]
        if self.escape:
            cut = "".join(
                char
                if (char.isascii() and char.isprintable()) or (keep_lines and char == "\n")
                else _escape_char(char)
                for char in cut
            )
        return cut if len(value) <= limit else f"{cut}...(+{len(value) - limit} chars)"


class BoundedJSONLines:
    """The JSON lines renderer (ascii_json) with SafeValues' bound folded in: each character of a
    string value takes at least a byte of the line, so a line of at most MAX_VALUE_CHARS bytes holds
    no longer string and is written as rendered. Only a longer line has its values bounded, and is
    rendered again: the same lines as SafeValues before the renderer, without a loop over the
    values of every line (request lines are about a third of the bound)."""

    def __init__(self) -> None:
        self._bound = SafeValues(escape=False)

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> bytes:
        line = ascii_json(event)
        if len(line) <= MAX_VALUE_CHARS:
            return line
        return ascii_json(self._bound(logger, name, event))


def configure_logging(level: str = "info", json_lines: bool | None = None) -> None:
    """Logging for `level`; JSON lines unless stderr is a terminal (json_lines decides when given)."""
    as_json = (not sys.stderr.isatty()) if json_lines is None else json_lines
    stderr_bytes: BinaryIO | None = getattr(sys.stderr, "buffer", None)
    factory: Any
    rendering: list[structlog.types.Processor]
    if as_json and stderr_bytes is not None:
        rendering = [BoundedJSONLines()]
        factory = _BatchedBytesLoggerFactory(stderr_bytes)
    else:
        renderer = (
            structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=False)
        )
        rendering = [SafeValues(escape=not as_json), renderer]
        factory = structlog.PrintLoggerFactory(file=sys.stderr)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            *rendering,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )


def ascii_json(value: Any, **_: Any) -> bytes:
    """One JSON line, pure ASCII: a client-chosen string holding U+2028, U+2029 or U+0085 (line
    breaks to some readers, e.g. str.splitlines) is escaped, so it can never forge a line."""
    try:
        line = orjson.dumps(value, default=str)
        if line.isascii():
            return line
    except TypeError:  # orjson.JSONEncodeError: a lone surrogate or an int beyond 64 bits
        pass
    return json.dumps(value, default=str, separators=(",", ":")).encode("ascii")


_requests_log = structlog.get_logger("proxy.requests")
MAX_METHOD_CHARS = 128  # a client-chosen method is bounded like every other string it chooses


def request_line(exchange: Exchange, trace_id: str | None = None) -> None:
    """The done hook: one structured line per exchange (names, outcome, timing; never content; its
    trace, when traced). Refusals by a tenant's limits are counted in aggregate instead
    (limits.RefusalLog): a flood of them cannot flood the log."""
    if exchange.limited is not None:
        return
    message, ctx, era = exchange.message, exchange.ctx, exchange.era
    method = message.method if message is not None else None
    logger = _requests_log if trace_id is None else _requests_log.bind(trace_id=trace_id)
    request = exchange.request
    request_id: str | None
    try:  # (a web.Request's get() is a Python mixin that raises and catches KeyError on a miss)
        request_id, client_request_id = request[REQUEST_ID], request[CLIENT_REQUEST_ID]
    except KeyError:  # a request that did not pass the edge middleware
        request_id, client_request_id = request.get(REQUEST_ID), request.get(CLIENT_REQUEST_ID)
    logger.info(
        "mcp_request",
        request_id=request_id,
        client_request_id=client_request_id,
        http_method=exchange.request.method,
        tenant=ctx.tenant if ctx is not None else None,
        era=era.value if era is not None else None,
        method=method[:MAX_METHOD_CHARS] if method is not None else None,
        outcome=exchange.outcome,
        cache=exchange.cache_state,
        error_code=exchange.error_code,
        duration_ms=round(exchange.duration_seconds * 1000, 3),
    )
