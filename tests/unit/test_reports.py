"""Reports after the answer: each exchange's log line, audit record and metrics follow its answer,
run within a moment, each with its own request id, and before anyone reads what they produce."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from functools import partial
from typing import Any

import pytest
import structlog

from proxy.flow import Exchange
from proxy.http.endpoint import DONE
from proxy.http.endpoint import finish as finish_with
from proxy.http.keys import REQUEST_ID
from proxy.ops.reports import MAX_PENDING_REPORTS, REPORT_DELAY_SECONDS, Reports
from proxy.types import Era
from tests.factories import make_config, make_request


def finish(exchange: Exchange) -> None:
    finish_with(exchange, DONE)


def answered(tenant: str, request_id: str) -> Exchange:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "lookup"}}
    exchange = make_request(make_config(), tenant, body, Era.MODERN)
    exchange.request[REQUEST_ID] = request_id
    return exchange


def request_lines(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [line for line in logs if line.get("event") == "mcp_request"]


def test_reports_run_after_a_moment_not_when_added() -> None:
    ran: list[int] = []

    async def main() -> None:
        reports = Reports()
        reports.add(lambda: ran.append(1))
        reports.add(lambda: ran.append(2))
        await asyncio.sleep(0)
        assert ran == []  # the answer leaves first
        await asyncio.sleep(REPORT_DELAY_SECONDS * 20)
        assert ran == [1, 2]
        assert len(reports) == 0

    asyncio.run(main())


def test_waiting_for_an_upstream_runs_pending_reports_at_the_next_suspension() -> None:
    ran: list[str] = []

    async def main() -> None:
        reports = Reports(delay=60.0)  # the timer would never fire within this test
        reports.add(lambda: ran.append("report"))
        reports.while_waiting()
        assert ran == []
        await asyncio.sleep(0)
        assert ran == ["report"]
        reports.while_waiting()  # nothing pending: nothing scheduled
        await asyncio.sleep(0)
        assert ran == ["report"]

    asyncio.run(main())


def test_run_now_runs_everything_pending_in_order_and_one_failure_costs_no_other() -> None:
    ran: list[int] = []

    def broken() -> None:
        raise RuntimeError("boom")

    async def main() -> None:
        reports = Reports(delay=60.0)
        reports.add(lambda: ran.append(1))
        reports.add(broken)
        reports.add(lambda: ran.append(3))
        with structlog.testing.capture_logs() as logs:
            reports.run_now()
        assert ran == [1, 3]
        assert [line["event"] for line in logs] == ["report_failed"]

    asyncio.run(main())


def test_reports_run_in_an_empty_context_not_the_first_requests() -> None:
    seen: list[dict[str, Any]] = []

    async def main() -> None:
        reports = Reports()
        structlog.contextvars.bind_contextvars(request_id="first", tenant="acme")
        reports.add(lambda: seen.append(structlog.contextvars.get_contextvars()))
        structlog.contextvars.clear_contextvars()
        await asyncio.sleep(REPORT_DELAY_SECONDS * 20)
        structlog.contextvars.bind_contextvars(request_id="second", tenant="globex")
        reports.add(lambda: seen.append(structlog.contextvars.get_contextvars()))
        reports.while_waiting()
        await asyncio.sleep(0)

    asyncio.run(main())
    assert seen == [{}, {}]


def test_without_an_event_loop_reports_run_at_once() -> None:
    ran: list[int] = []
    Reports().add(lambda: ran.append(1))
    assert ran == [1]


def test_a_burst_beyond_the_bound_is_reported_at_once() -> None:
    ran: list[int] = []

    async def main() -> None:
        reports = Reports(delay=60.0)
        for n in range(MAX_PENDING_REPORTS - 1):
            reports.add(partial(ran.append, n))
        assert ran == []
        reports.add(lambda: ran.append(-1))
        assert len(ran) == MAX_PENDING_REPORTS  # memory stays bounded under any load
        assert len(reports) == 0

    asyncio.run(main())


def test_finish_reports_after_the_answer_each_line_with_its_own_request_id() -> None:
    async def main() -> list[MutableMapping[str, Any]]:
        first, second = answered("acme", "req-acme"), answered("globex", "req-globex")
        with structlog.testing.capture_logs() as logs:
            # The first request's id is bound in the context the batch's timer is created in.
            structlog.contextvars.bind_contextvars(request_id="req-acme", tenant="acme")
            finish(first)
            structlog.contextvars.bind_contextvars(request_id="req-globex", tenant="globex")
            finish(second)
            structlog.contextvars.clear_contextvars()
            assert request_lines(logs) == []  # nothing before the answers have left
            await asyncio.sleep(REPORT_DELAY_SECONDS * 20)
        return request_lines(logs)

    lines = asyncio.run(main())
    assert [(line["request_id"], line["tenant"]) for line in lines] == [
        ("req-acme", "acme"),
        ("req-globex", "globex"),
    ]


@pytest.mark.parametrize("reader", ["flush", "close"])
def test_readers_of_reports_see_every_exchange_finished_so_far(reader: str) -> None:
    async def main() -> None:
        exchange = answered("acme", "req-1")
        services = exchange.services
        finish(exchange)
        assert await services.audit.recent("acme", 10) == []  # still pending
        if reader == "flush":
            services.flush()
        else:
            await services.close()
        (record,) = await services.audit.recent("acme", 10)
        assert record["method"] == "tools/call"
        text = services.metrics.render().decode()
        assert 'mcp_proxy_requests_total{method="tools/call",outcome="ok",tenant="acme"} 1.0' in text

    asyncio.run(main())
