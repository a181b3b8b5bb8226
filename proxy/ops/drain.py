"""Stopping without dropping anyone, in a bounded time: what SIGTERM and SIGINT start.

    signal                /readyz answers 503 ("reason": "draining"); everything is still served,
                          so clients routed here while load balancers catch up get their answers
    + drain_delay         the listener closes, idle keep-alive connections too (busy ones after
                          their answer), open GET streams end cleanly
    + shutdown_grace      requests in flight have had this long to finish: each one still open is
                          answered with a JSON-RPC error (-32014; a JSON answer as HTTP 503, an SSE
                          stream with an error event) and audited `cancelled`; the upstream call is
                          abandoned (a stdio child is sent notifications/cancelled)
    + about 1 s           this process's own sessions are ended upstream (shared ones stay: other
                          replicas serve them), upstreams closed, the audit written; exit 0

A second SIGTERM or SIGINT skips what is left of the delay and the grace. Kubernetes: the pod's
terminationGracePeriodSeconds must exceed drain_delay + grace + 1 s (deploy/*.yaml do).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any, Final

import structlog

from proxy.http.edge import error_reply
from proxy.http.keys import RUNTIME, SERVICES
from proxy.layers.sessions.stage import end_upstream_session
from proxy.protocol.errors import ShuttingDown
from proxy.protocol.jsonrpc import dumps
from proxy.protocol.sse import encode_event

if TYPE_CHECKING:
    from aiohttp import web

    from proxy.flow import Exchange
    from proxy.http.server import ProxyRunner
    from proxy.runtime import Runtime, Services

log = structlog.get_logger("proxy.drain")

FINAL_SECONDS: Final = 0.9  # after the grace: last answers, sessions ended upstream, upstreams closed
LAST_WORD_SECONDS: Final = 0.25  # how long exchanges cut short get to write their error
STRAGGLER_SECONDS: Final = 0.1  # a connection still busy after that is closed


class Drain:
    """Which exchanges are in flight, and how far the stop has come (one per process, in Services)."""

    def __init__(self) -> None:
        self.draining = False  # the stop has begun: /readyz says not ready
        self.deadline: float | None = None  # the grace is over: what is left must be done by then
        self._open: set[asyncio.Task[Any]] = set()
        self._cut: set[asyncio.Task[Any]] = set()  # cancelled by the stop: they answer with an error
        self._settled = asyncio.Event()

    @property
    def in_flight(self) -> int:
        return len(self._open)

    def enter(self) -> asyncio.Task[Any] | None:
        """An exchange starts in the current task (the MCP endpoint's handler)."""
        task = asyncio.current_task()
        if task is not None:
            self._open.add(task)
            self._settled.clear()
        return task

    def leave(self, task: asyncio.Task[Any] | None) -> None:
        self._open.discard(task)
        self._cut.discard(task)
        if not self._open:
            self._settled.set()

    def was_cut_short(self) -> bool:
        """Whether the cancellation the current task is handling came from the stop (not from a
        client that went away); if so it is taken back, so the task can still write its answer."""
        task = asyncio.current_task()
        if task is None or task not in self._cut:
            return False
        self._cut.discard(task)
        task.uncancel()
        return True

    async def settled(self, seconds: float, hurry: asyncio.Event) -> bool:
        """Wait until no exchange is in flight, for at most `seconds` (or until `hurry`)."""
        if not self._open:
            return True
        await _first(self._settled, hurry, seconds)
        return not self._open

    async def cut_short(self) -> None:
        """The grace is over: every exchange still open is cancelled and answers with an error."""
        self.deadline = time.monotonic() + FINAL_SECONDS
        self._cut = set(self._open)
        for task in self._cut:
            task.cancel()
        if self._cut:
            await _first(self._settled, None, LAST_WORD_SECONDS)

    def time_left(self) -> float | None:
        """What is left of the stop's last second; None when no drain bounds it (in-process use)."""
        if self.deadline is None:
            return None
        return max(0.05, self.deadline - time.monotonic())


async def _first(event: asyncio.Event, hurry: asyncio.Event | None, seconds: float) -> None:
    """Until `event` (or `hurry`) is set, for at most `seconds`."""
    waits = [asyncio.ensure_future(e.wait()) for e in (event, hurry) if e is not None]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def last_word(exchange: Exchange) -> web.StreamResponse:
    """The answer of an exchange the stop cut short: a JSON-RPC error, audited as cancelled."""
    exchange.outcome = "cancelled"
    stream = exchange.stream
    if stream is None:
        return error_reply(exchange, ShuttingDown())
    if not exchange.delivered:  # an SSE stream under way: its last event is the error
        error = ShuttingDown()
        exchange.error_code, exchange.delivered = error.code, True
        with contextlib.suppress(ConnectionError, RuntimeError):  # (the client may be gone too)
            if exchange.message is not None:
                await stream.write(encode_event(dumps(error.to_jsonrpc(exchange.request_id))))
            await stream.write_eof()
    return stream


async def drain_and_stop(runner: ProxyRunner, hurry: asyncio.Event) -> None:
    """The whole stop (module docstring), once the first SIGTERM/SIGINT came; `hurry` is the second."""
    app = runner.app
    services, listen = app[SERVICES], app[RUNTIME].current.config.listen
    drain = services.drain
    drain.draining = True
    delay, grace = listen.drain_delay_seconds, listen.shutdown_grace_seconds
    log.info("draining", delay_seconds=delay, grace_seconds=grace, in_flight=drain.in_flight)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(hurry.wait(), delay)
    for site in list(runner.sites):
        await site.stop()
    if runner.server is not None:
        runner.server.pre_shutdown()  # idle keep-alive connections close; busy ones after their answer
    services.shutting_down.set()  # open GET streams end
    log.info("stopped_accepting", in_flight=drain.in_flight)
    if not await drain.settled(grace, hurry):
        log.warning("grace_over", cut_short=drain.in_flight)
        await drain.cut_short()
    else:
        drain.deadline = time.monotonic() + FINAL_SECONDS
    # Connections still busy (an answer being written) get a moment, not the whole grace again.
    runner.limit_shutdown(STRAGGLER_SECONDS)
    await runner.cleanup()


async def end_own_sessions(services: Services, runtime: Runtime) -> None:
    """End this process's sessions upstream, all at once (shared ones stay: other replicas serve
    them); during a stop, within half of what is left of its last second."""
    if services.sessions.shared:
        return
    ending = []
    for session in services.sessions.all():
        await services.sessions.remove(session)
        tenant = runtime.tenants.of_tenant(session.tenant)
        if tenant is not None:
            ending.append(end_upstream_session(tenant.upstream, session))
    left = services.drain.time_left()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            asyncio.gather(*ending, return_exceptions=True), None if left is None else left / 2
        )


async def close_upstreams(services: Services, runtime: Runtime) -> None:
    """Close every upstream (stdio children stop); during a stop, by its deadline (a child still
    running then is killed)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(runtime.close(), services.drain.time_left())
