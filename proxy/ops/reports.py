"""What every exchange reports once its answer has left: its log line, audit record and metrics.

None of it changes what the client receives, so it runs just after the answer is written instead
of before: at concurrency 1 it lands in the time the proxy waits for the next request's upstream
answer rather than adding to each request's latency, and under load the reports of a moment run
together. A report runs within REPORT_DELAY_SECONDS of being added; whatever reads what reports
produce (/metrics, the audit trail, proxy_recent_activity, shutdown) runs the pending ones first,
so no reader ever sees less than every answered exchange.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from typing import Final

import structlog

REPORT_DELAY_SECONDS: Final = 0.001
MAX_PENDING_REPORTS: Final = 512  # a burst larger than this reports at once: memory stays bounded

log = structlog.get_logger("proxy.ops.reports")


class Reports:
    """Reports waiting to run: one timer per batch, run in an empty logging context (each report
    names its own request id and tenant, never the context of whichever request came first)."""

    def __init__(self, delay: float | None = None) -> None:
        self._delay = REPORT_DELAY_SECONDS if delay is None else delay
        self._pending: list[Callable[[], None]] = []
        self._timer: asyncio.Handle | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, report: Callable[[], None]) -> None:
        self._pending.append(report)
        if self._timer is not None:
            if len(self._pending) >= MAX_PENDING_REPORTS:
                self.run_now()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a script, a unit test): report at once
            self.run_now()
            return
        self._timer = loop.call_later(self._delay, self.run_now, context=contextvars.Context())

    def while_waiting(self) -> None:
        """The caller is about to wait for an upstream: pending reports run in that wait (at the
        caller's next suspension) rather than on a timer that may fall into someone's answer."""
        if self._pending:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_soon(self.run_now, context=contextvars.Context())

    def run_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending:
            batch, self._pending = self._pending, []
            for report in batch:
                try:
                    report()
                except Exception:  # one broken report must not cost the others theirs
                    log.exception("report_failed")
