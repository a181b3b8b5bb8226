"""Layer 4: a tenant-scoped, summary-only audit trail.

One JSON line per MCP request in `<audit.dir>/<tenant>.jsonl`, rendered by structlog:

    ts, tenant, subject, session (hash), era, method, name, argument_keys, outcome, cache,
    error_code, result_bytes, result_sha256, duration_ms

Never an argument value, never result content, never a token. JSON rendering escapes newlines and
control characters, so no value can forge a line. Files are opened append-only, written by one
background thread (the event loop never blocks on disk), rotated by size with a bounded number
of backups. The last records of each tenant are also kept in memory for `proxy_recent_activity`.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import structlog

from proxy.types import Exchange, JsonObject

MAX_ARGUMENT_KEYS: Final = 50
MAX_KEY_CHARS: Final = 64
RECENT_PER_TENANT: Final = 200
_render = structlog.processors.JSONRenderer(sort_keys=False)


def argument_keys(arguments: Any) -> list[str]:
    """The top-level argument names (never their values), bounded in number and length."""
    if not isinstance(arguments, dict):
        return []
    return [str(key)[:MAX_KEY_CHARS] for key in list(arguments)[:MAX_ARGUMENT_KEYS]]


def summarize(exchange: Exchange) -> JsonObject | None:
    """The audit record of one exchange, or None when no tenant was established."""
    ctx = exchange.ctx
    if ctx is None:
        return None
    message = exchange.message
    params = message.params if message is not None else {}
    name = message.name if message is not None else None
    return {
        "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "tenant": ctx.tenant,
        "subject": ctx.subject,
        "session": exchange.session.audit_id if exchange.session is not None else None,
        "era": exchange.era.value if exchange.era is not None else None,
        "http_method": exchange.request.method,
        "method": message.method if message is not None else None,
        "name": name[:256] if name is not None else None,
        "argument_keys": argument_keys(params.get("arguments")),
        "outcome": exchange.outcome,
        "cache": exchange.cache_state,
        "error_code": exchange.error_code,
        "result_bytes": exchange.result_bytes,
        "result_sha256": exchange.result_sha256,
        "duration_ms": round((time.perf_counter() - exchange.started) * 1000, 3),
    }


class AuditLog:
    def __init__(self, directory: Path | None, max_file_bytes: int, backups: int) -> None:
        self.directory = directory
        self.max_file_bytes = max_file_bytes
        self.backups = backups
        self._recent: dict[str, deque[JsonObject]] = {}
        # A line for a tenant's file; an Event to set once all before it is written; None: stop.
        self._queue: queue.SimpleQueue[tuple[str, str] | threading.Event | None] = queue.SimpleQueue()
        self._handlers: dict[str, logging.handlers.RotatingFileHandler] = {}
        self._thread: threading.Thread | None = None
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._thread = threading.Thread(target=self._write_forever, name="audit-writer", daemon=True)
            self._thread.start()

    def record(self, exchange: Exchange) -> None:
        summary = summarize(exchange)
        if summary is None:
            return
        tenant = summary["tenant"]
        self._recent.setdefault(tenant, deque(maxlen=RECENT_PER_TENANT)).append(summary)
        if self._thread is not None:
            line = _render(None, "", dict(summary))
            self._queue.put((tenant, line if isinstance(line, str) else line.decode()))

    def recent(self, tenant: str, limit: int) -> list[JsonObject]:
        """The tenant's own latest records, newest first."""
        records = self._recent.get(tenant, ())
        return list(reversed(list(records)[-limit:]))

    def forget(self, tenants: Iterable[str]) -> None:
        for tenant in tenants:
            self._recent.pop(tenant, None)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every record queued so far is on disk."""
        if self._thread is None:
            return
        written = threading.Event()
        self._queue.put(written)
        written.wait(timeout)

    def close(self) -> None:
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
            tenant, line = item
            try:
                self._handler(tenant).emit(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))
            except Exception:  # a full disk must not take the proxy down; the operator log says so
                structlog.get_logger("proxy.audit").exception("audit_write_failed", tenant=tenant)
        for handler in self._handlers.values():
            handler.close()

    def _handler(self, tenant: str) -> logging.handlers.RotatingFileHandler:
        handler = self._handlers.get(tenant)
        if handler is None:
            assert self.directory is not None
            path = self.directory / f"{tenant}.jsonl"
            handler = logging.handlers.RotatingFileHandler(
                path, mode="a", maxBytes=self.max_file_bytes, backupCount=self.backups, encoding="utf-8"
            )
            handler.setFormatter(logging.Formatter("%(message)s"))
            os.chmod(path, 0o600)
            self._handlers[tenant] = handler
        return handler
