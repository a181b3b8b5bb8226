"""THREATS I, metrics: the tenants and their activity are not shown to whoever reaches the proxy.

/metrics names every tenant. By default it is served on a listener of its own (`metrics.listen`)
and the public listener, where tenants' clients connect, answers 404; `metrics.public: true` serves
it there too, and `metrics.bearer_token_env` guards both.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from proxy.config import MetricsConfig
from proxy.http.keys import METRICS_LISTENER
from tests.conftest import RunningProxy, StartProxy
from tests.e2e.test_transport_e2e import call_body, modern_headers

pytestmark = pytest.mark.e2e


async def fetch(url: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as response:
        return response.status, await response.text()


def public_metrics(running: RunningProxy) -> str:
    return running.url.rsplit("/", 1)[0] + "/metrics"


async def busy(running: RunningProxy) -> None:
    status, _, _ = await running.post(
        call_body("whoami", {}), token=running.token("globex"), headers=modern_headers("tools/call", "whoami")
    )
    assert status == 200


async def test_the_public_listener_does_not_serve_metrics_by_default(proxy: RunningProxy) -> None:
    await busy(proxy)
    status, text = await fetch(public_metrics(proxy))
    assert status == 404
    assert "globex" not in text and "mcp_proxy" not in text
    status, text = await fetch(proxy.metrics_url)  # the metrics listener does
    assert status == 200
    assert 'tenant="globex"' in text
    assert proxy.app[METRICS_LISTENER].port != proxy.config.listen.port


async def test_metrics_public_serves_them_on_both_listeners(
    make_proxy: StartProxy, upstreams: dict[str, Any]
) -> None:
    running = await make_proxy(upstreams, metrics={"public": True})
    await busy(running)
    for url in (public_metrics(running), running.metrics_url):
        status, text = await fetch(url)
        assert status == 200
        assert 'tenant="globex"' in text


async def test_the_bearer_token_guards_both_listeners(
    make_proxy: StartProxy, upstreams: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MCP_TEST_METRICS_TOKEN", "scraper-token-0123456789")
    running = await make_proxy(
        upstreams, metrics={"public": True, "bearer_token_env": "MCP_TEST_METRICS_TOKEN"}
    )
    await busy(running)
    for url in (public_metrics(running), running.metrics_url):
        assert (await fetch(url))[0] == 401
        assert (await fetch(url, running.token("globex")))[0] == 401
        status, text = await fetch(url, "scraper-token-0123456789")
        assert status == 200 and 'tenant="globex"' in text


async def test_without_a_metrics_listener_nothing_serves_them(
    make_proxy: StartProxy, upstreams: dict[str, Any]
) -> None:
    running = await make_proxy(upstreams, metrics={"listen": None})
    assert running.app[METRICS_LISTENER].port is None
    assert (await fetch(public_metrics(running)))[0] == 404


def test_the_metrics_listener_defaults_to_loopback_9464() -> None:
    config = MetricsConfig()
    assert config.listen is not None
    assert (config.listen.host, config.listen.port, config.public) == ("127.0.0.1", 9464, False)
