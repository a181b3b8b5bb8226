"""Layer 4: a tenant-scoped, summary-only audit trail.

One JSON line per MCP request in `<audit.dir>/<tenant>.jsonl`, rendered by orjson (pure ASCII):

    ts, tenant, subject, session (hash), era, method, name, argument_keys, outcome, cache,
    error_code, result_bytes, result_sha256, duration_ms, task (hash), task_event, and with
    tracing on, trace_id (the request's trace, to find its spans)

outcome is ok, error, denied, spoof or cancelled (the client went away before its answer, or
cancelled the request itself).

Never an argument value, never result content, never a token. JSON rendering escapes newlines and
control characters, so no value can forge a line. Files are opened append-only, written by one
background thread (the event loop never blocks on disk), rotated by size with a bounded number
of backups. The last records of each tenant are also kept in memory for `proxy_recent_activity`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import logging.handlers
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TextIO

import structlog

from proxy.layers.containment.backend import AuditSink
from proxy.ops.log import ascii_json
from proxy.types import JsonObject

if TYPE_CHECKING:
    from proxy.flow import Exchange

MAX_ARGUMENT_KEYS: Final = 50
MAX_KEY_CHARS: Final = 64
MAX_METHOD_CHARS: Final = 128  # a client-chosen method is bounded like every other string it chooses
RECENT_PER_TENANT: Final = 200
BATCH_SECONDS: Final = 0.05
# Audit files kept open at once: the least recently written is closed beyond this (reopened in
# append mode when its tenant writes again), so many tenants never exhaust file descriptors (nor
# hold a file buffer each).
MAX_OPEN_FILES: Final = 64


def _argument_names(arguments: Any) -> tuple[str, ...]:
    """The top-level argument names (never their values), bounded in number."""
    if not isinstance(arguments, dict):
        return ()
    return tuple(itertools.islice(arguments, MAX_ARGUMENT_KEYS))


class AuditRecord(NamedTuple):
    """One request's summary. Built on the event loop as a tuple; turned into the JSON line (or the
    dict proxy_recent_activity shows) only when needed, off the request's path."""

    ts: float
    tenant: str
    subject: str
    issuer: str
    session: str | None
    era: str | None
    http_method: str
    method: str | None
    name: str | None
    argument_names: tuple[str, ...]  # never the values: they are not even kept in memory
    outcome: str
    cache: str
    error_code: int | None
    result_bytes: int
    result_sha256: str | None
    duration_ms: float
    task: str | None  # a hash of the task id this request created or saw finish, never the id
    task_event: str | None  # created | completed | failed | cancelled
    trace_id: str | None = None  # with tracing on: the request's trace (absent from the line otherwise)

    def as_dict(self) -> JsonObject:
        record = self._asdict()
        record["ts"] = datetime.fromtimestamp(self.ts, UTC).isoformat(timespec="milliseconds")
        del record["argument_names"]
        record["argument_keys"] = [name[:MAX_KEY_CHARS] for name in self.argument_names]
        shown = {key: record[key] for key in _FIELD_ORDER}
        if self.trace_id is not None:
            shown["trace_id"] = self.trace_id
        return shown


_FIELD_ORDER = (
    "ts", "tenant", "subject", "issuer", "session", "era", "http_method", "method", "name", "argument_keys",
    "outcome", "cache", "error_code", "result_bytes", "result_sha256", "duration_ms", "task", "task_event",
)  # fmt: skip


def bounded_method(method: str | None) -> str | None:
    """The method as logs and audit records show it: a client may send any string there."""
    return method[:MAX_METHOD_CHARS] if method is not None else None


def summarize(exchange: Exchange, trace_id: str | None = None) -> AuditRecord | None:
    """The audit record of one exchange, or None when no tenant was established."""
    ctx = exchange.ctx
    if ctx is None:
        return None
    message = exchange.message
    name = message.name if message is not None else None
    return AuditRecord(
        exchange.ended_at if exchange.ended_at is not None else time.time(),
        ctx.tenant,
        ctx.subject,
        ctx.issuer,
        exchange.session.audit_id if exchange.session is not None else None,
        exchange.era.value if exchange.era is not None else None,
        exchange.request.method,
        bounded_method(message.method if message is not None else None),
        name[:256] if name is not None else None,
        _argument_names(message.params.get("arguments") if message is not None else None),
        exchange.outcome,
        exchange.cache_state,
        exchange.error_code,
        exchange.result_bytes,
        exchange.result_sha256,
        round(exchange.duration_seconds * 1000, 3),
        exchange.task,
        exchange.task_event,
        trace_id,
    )


def audit_record(exchange: Exchange, trace_id: str | None = None) -> None:
    """The done hook: the exchange's summary in its tenant's trail (naming its trace, if traced)."""
    exchange.services.audit.record(exchange, trace_id)


class AuditLog:
    def __init__(
        self, directory: Path | None, max_file_bytes: int, backups: int, sink: AuditSink | None = None
    ) -> None:
        self.directory = directory
        self.sink = sink  # shared state (Redis): every record also goes there, for every replica to read
        self.max_file_bytes = max_file_bytes
        self.backups = backups
        self._recent: dict[str, deque[AuditRecord]] = {}
        # A batch of records; tenants whose files to close; an Event to set once all before it is
        # written; None: stop.
        self._queue: queue.SimpleQueue[list[AuditRecord] | frozenset[str] | threading.Event | None] = (
            queue.SimpleQueue()
        )
        self._pending: list[AuditRecord] = []  # records of the last moments, handed over in one batch
        self._handlers: OrderedDict[str, logging.handlers.RotatingFileHandler] = OrderedDict()  # oldest first
        self._thread: threading.Thread | None = None
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._thread = threading.Thread(target=self._write_forever, name="audit-writer", daemon=True)
            self._thread.start()

    def record(self, exchange: Exchange, trace_id: str | None = None) -> None:
        summary = summarize(exchange, trace_id)
        if summary is None:
            return
        self._recent.setdefault(summary.tenant, deque(maxlen=RECENT_PER_TENANT)).append(summary)
        if self._thread is None and self.sink is None:
            return
        self._pending.append(summary)
        if len(self._pending) == 1:  # the first of a batch: hand the batch over shortly
            try:
                asyncio.get_running_loop().call_later(BATCH_SECONDS, self._hand_over)
            except RuntimeError:  # no event loop (a script, a test): hand over at once
                self._hand_over()

    def _hand_over(self) -> None:
        """One wake-up of the writer per batch, not per request (rendering happens over there)."""
        if self._pending:
            batch, self._pending = self._pending, []
            if self._thread is not None:
                self._queue.put(batch)
            if self.sink is not None:
                self.sink.write(batch)

    async def recent(self, tenant: str, limit: int) -> list[JsonObject]:
        """The tenant's own latest records, newest first (across replicas when they share a sink)."""
        if self.sink is not None:
            self._hand_over()
            shared = await self.sink.recent(tenant, limit)
            if shared is not None:
                return shared
        records = self._recent.get(tenant, ())
        return [record.as_dict() for record in reversed(list(records)[-limit:])]

    def forget(self, tenants: Iterable[str]) -> None:
        """Tenants no longer served here: their recent records go, their files are closed (after
        the records already handed over are written)."""
        gone = frozenset(tenants)
        for tenant in gone:
            self._recent.pop(tenant, None)
        if self._thread is not None and gone:
            self._hand_over()
            self._queue.put(gone)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every record queued so far is on disk."""
        if self._thread is None:
            return
        self._hand_over()
        written = threading.Event()
        self._queue.put(written)
        written.wait(timeout)

    def close(self) -> None:
        self._hand_over()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    def _write_forever(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            if isinstance(item, threading.Event):
                item.set()
                continue
            if isinstance(item, frozenset):
                for tenant in item:
                    self._close(tenant)
                continue
            lines: dict[str, list[str]] = {}
            for summary in item:
                lines.setdefault(summary.tenant, []).append(render_line(summary.as_dict()))
            for tenant, tenant_lines in lines.items():
                try:
                    self._append(tenant, tenant_lines)
                except Exception:  # a full disk must not take the proxy down; the operator log says so
                    structlog.get_logger("proxy.layers.containment.audit").exception(
                        "audit_write_failed", tenant=tenant
                    )
        for handler in self._handlers.values():
            handler.close()

    def _append(self, tenant: str, lines: list[str]) -> None:
        """One write per tenant and batch; the file is rotated before a line that would take it
        to max_file_bytes (as RotatingFileHandler does per record, with its file names)."""
        handler = self._handler(tenant)
        stream = _stream_of(handler)
        # Rotation needs a regular file's size: a FIFO or device (as the operator chose) is written.
        rotating = self.max_file_bytes > 0 and self.backups > 0 and stream.seekable()
        size = stream.seek(0, os.SEEK_END) if rotating else 0
        chunk: list[str] = []
        for line in lines:
            if rotating and size + len(line) >= self.max_file_bytes and (chunk or size):
                stream.write("".join(chunk))
                chunk = []
                handler.doRollover()
                stream = _stream_of(handler)
                os.chmod(handler.baseFilename, 0o600)
                size = 0
            chunk.append(line)
            size += len(line)  # lines are pure ASCII: characters are bytes
        stream.write("".join(chunk))
        stream.flush()

    def _handler(self, tenant: str) -> logging.handlers.RotatingFileHandler:
        handler = self._handlers.get(tenant)
        if handler is not None:
            self._handlers.move_to_end(tenant)
            return handler
        assert self.directory is not None
        path = self.directory / f"{tenant}.jsonl"
        handler = logging.handlers.RotatingFileHandler(
            path, mode="a", maxBytes=self.max_file_bytes, backupCount=self.backups, encoding="utf-8"
        )
        os.chmod(path, 0o600)
        self._handlers[tenant] = handler
        while len(self._handlers) > MAX_OPEN_FILES:
            self._close(next(iter(self._handlers)))
        return handler

    def _close(self, tenant: str) -> None:
        handler = self._handlers.pop(tenant, None)
        if handler is not None:
            handler.close()


def _stream_of(handler: logging.handlers.RotatingFileHandler) -> TextIO:
    """The handler's open file. A rollover whose reopening failed (no file descriptors, a full
    disk) leaves none: it is opened again here, so one failure never ends a tenant's trail."""
    if handler.stream is None:
        handler.stream = handler._open()
        os.chmod(handler.baseFilename, 0o600)
    return handler.stream


def render_line(record: JsonObject) -> str:
    """One audit line: JSON, pure ASCII (no value can hold a line break any reader honours)."""
    return ascii_json(record).decode("ascii") + "\n"
