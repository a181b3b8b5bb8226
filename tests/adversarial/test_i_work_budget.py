"""THREATS I, event-loop time: a tenant whose requests took more than its share of the proxy's time
(`limits.work_share`) is refused before its next body is read while other tenants are being
served, and never when it is alone; its refusals, held while their bodies are still arriving, cost
no CPU and are bounded by its own concurrency. (What the budget buys: bench s11_worst_case.)

The budget charges an exchange's time on the loop beyond an ordinary request's; the tests charge
all of it (ORDINARY_SECONDS = 0) and give globex a budget of a microsecond a second, so that any
request puts it in debt: no timing threshold decides an outcome here.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlsplit

import pytest

from proxy.http.keys import SERVICES
from proxy.layers.limits import work
from tests.conftest import MCP_ACCEPT, RunningProxy, StartProxy
from tests.e2e.test_transport_e2e import call_body, modern_headers

pytestmark = pytest.mark.e2e

BODY_BYTES = 200_000  # announced; only the first part is ever sent


async def whoami(running: RunningProxy, tenant: str, sub: str = "alice") -> int:
    status, _, _ = await running.post(
        call_body("whoami", {}),
        token=running.token(tenant, sub),
        headers=modern_headers("tools/call", "whoami"),
    )
    return status


async def partial_post(
    running: RunningProxy, tenant: str, sub: str = "alice"
) -> tuple[int, str, dict[str, Any]]:
    """A tools/call whose body never arrives in full: the answer can only come from a refusal made
    before the body was read. Returns the status, the response head and the JSON-RPC error."""
    url = urlsplit(running.url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    headers = {
        **modern_headers("tools/call", "whoami"),
        "Authorization": f"Bearer {running.token(tenant, sub)}",
        "Accept": MCP_ACCEPT,
        "Content-Type": "application/json",
        "Content-Length": str(BODY_BYTES),
    }
    head = f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    writer.write(head.encode() + b'{"jsonrpc":"2.0","id":1,' + b" " * 1000)
    try:
        answer = await reader.read()  # to the end: the proxy closes the connection after it
    finally:
        writer.close()
    response_head, _, body = answer.partition(b"\r\n\r\n")
    status = int(response_head.split(b" ", 2)[1])
    return status, response_head.decode().lower(), json.loads(body)["error"]


async def start(make_proxy: StartProxy, upstreams: dict[str, Any], **limits: Any) -> RunningProxy:
    return await make_proxy(
        upstreams,
        tenants={
            "acme": {"upstream": {"url": upstreams["acme"].url}},
            "globex": {
                "upstream": {"url": upstreams["globex"].url},
                "limits": {"work_share": 1e-6, **limits},
            },
        },
    )


def calls_of(upstream: Any) -> int:
    return len([r for r in upstream.recorder.snapshot() if "tools/call" in r.text])


async def test_a_tenant_over_its_work_budget_is_refused_before_its_body_is_read(
    make_proxy: StartProxy, upstreams: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(work, "ORDINARY_SECONDS", 0.0)
    running = await start(make_proxy, upstreams, refusal_hold_seconds=0)
    assert await whoami(running, "globex") == 200  # now in debt, but alone: served
    assert await whoami(running, "globex") == 200
    assert await whoami(running, "acme") == 200  # another tenant is being served
    status, head, error = await partial_post(running, "globex")
    assert status == 429 and error["code"] == -32009 and error["data"]["limit"] == "work"
    assert "retry-after:" in head and "connection: close" in head  # the unread body is not drained
    assert calls_of(upstreams["globex"]) == 2
    assert await whoami(running, "acme") == 200  # acme's own budget is untouched
    assert calls_of(upstreams["acme"]) == 2


async def test_a_colleague_whose_requests_are_ordinary_is_never_held_back_for_a_users_debt(
    make_proxy: StartProxy, upstreams: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget is the tenant's, but only the users whose requests were charged lately are held
    back while it is in debt: one user's heavy requests never refuse a colleague's ordinary ones."""
    monkeypatch.setattr(work, "ORDINARY_SECONDS", 0.0)
    running = await start(make_proxy, upstreams, refusal_hold_seconds=0)
    assert await whoami(running, "globex", "mallory") == 200  # charged: globex in debt
    assert await whoami(running, "acme") == 200  # another tenant is being served
    status, _, error = await partial_post(running, "globex", "mallory")
    assert status == 429 and error["data"]["limit"] == "work"
    assert await whoami(running, "globex", "bob") == 200  # never charged before: served
    status, _, error = await partial_post(running, "globex", "mallory")
    assert status == 429 and error["data"]["limit"] == "work"


async def test_without_a_budget_the_same_tenant_is_served(
    make_proxy: StartProxy, upstreams: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(work, "ORDINARY_SECONDS", 0.0)
    running = await start(make_proxy, upstreams, work_share=0)
    for _ in range(3):
        assert await whoami(running, "globex") == 200
        assert await whoami(running, "acme") == 200


async def test_held_refusals_are_bounded_by_the_tenants_concurrency(
    make_proxy: StartProxy, upstreams: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(work, "ORDINARY_SECONDS", 0.0)
    running = await start(make_proxy, upstreams, refusal_hold_seconds=30, max_concurrent=1)
    assert await whoami(running, "globex") == 200
    assert await whoami(running, "acme") == 200
    limits = running.app[SERVICES].limiter.of(
        "globex", running.config.limits_of(running.config.tenants["globex"])
    )
    held = asyncio.create_task(partial_post(running, "globex"))
    async with asyncio.timeout(10):
        while limits.held < 1:  # the first refusal is being held
            await asyncio.sleep(0.01)
    status, _, error = await partial_post(running, "globex")  # beyond max_concurrent: answered at once
    assert status == 429 and error["data"]["limit"] == "work"
    assert not held.done() and limits.held == 1
    held.cancel()
