"""What the server/discover probe concludes from each kind of answer (upstreams/eras.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.protocol.errors import UpstreamError
from proxy.upstreams.base import MockResponse, MockUpstream, UpstreamRequest
from proxy.upstreams.eras import UpstreamEras, probe


def answering(status: int, error: Any = None, result: Any = None, sse: bool = False) -> MockUpstream:
    def handler(request: UpstreamRequest) -> MockResponse:
        assert request.headers["MCP-Protocol-Version"] == "2026-07-28"
        request_id = json.loads(request.body or b"{}")["id"]
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id}
        if error is not None:
            body["error"] = error
        elif result is not None:
            body["result"] = result
        else:
            return MockResponse(status, body=None)
        return MockResponse(status, events=[body]) if sse else MockResponse(status, body=body)

    return MockUpstream(handler)


LEGACY_ONLY = {"code": -32022, "message": "x", "data": {"supported": ["2025-11-25"]}}
MODERN_RESULT = {"supportedVersions": ["2026-07-28"], "capabilities": {}, "resultType": "complete"}


@pytest.mark.parametrize(
    ("upstream", "verdict"),
    [
        (answering(200, result=MODERN_RESULT), True),
        (answering(200, result=MODERN_RESULT, sse=True), True),
        (answering(400, error={"code": -32022, "message": "x", "data": {"supported": ["2026-07-28"]}}), True),
        (answering(200, result={"supportedVersions": ["2025-11-25"]}), False),  # a legacy advertisement
        (answering(200, error={"code": -32601, "message": "Method not found"}, sse=True), False),
        (answering(400, error={"code": -32000, "message": "Bad Request: Server not initialized"}), False),
        (answering(400, error=LEGACY_ONLY), False),
        (answering(404), False),
        (answering(405), False),
        (answering(200, error={"code": -32603, "message": "Internal error"}), None),
        (answering(200, result={"content": []}), None),  # not a DiscoverResult: no verdict either
        (answering(500), None),  # a failure says nothing about the era
        (answering(401), None),  # nor do refused credentials
    ],
)
async def test_the_probe_verdict(upstream: MockUpstream, verdict: bool | None) -> None:
    assert await probe(upstream) is verdict


async def test_an_unreachable_upstream_is_asked_again_later_and_a_verdict_is_kept() -> None:
    calls = 0

    def unreachable(request: UpstreamRequest) -> MockResponse:
        nonlocal calls
        calls += 1
        raise UpstreamError("The upstream MCP server is unreachable")

    eras = UpstreamEras()
    assert await eras.speaks_modern(MockUpstream(unreachable)) is None
    assert await eras.speaks_modern(MockUpstream(unreachable)) is None
    assert calls == 1  # not asked again at once
    learned = UpstreamEras()
    legacy = answering(404)
    assert await learned.speaks_modern(legacy) is False
    assert await learned.speaks_modern(legacy) is False
    assert len(legacy.requests) == 1  # learned once


def test_a_reload_learns_the_eras_again_even_for_an_upstream_it_keeps() -> None:
    from proxy.runtime import Runtime
    from tests.factories import make_config

    config = make_config()
    previous = Runtime.build(config)
    before = previous.tenants.of_tenant("acme")
    assert before is not None
    before.eras.modern = False
    after = Runtime.build(config, previous).tenants.of_tenant("acme")
    assert after is not None
    assert after.upstream is before.upstream  # connections kept
    assert after.eras.modern is None  # but what it speaks is asked again
