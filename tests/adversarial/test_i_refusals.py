"""THREATS I, refused requests: a tenant flooding with requests its limits refuse costs little.

Globex's rate limit refuses nearly everything it sends (429 with Retry-After, before the body is
read); acme is served meanwhile. Every refusal is counted in the metrics and audited, but the
operator log gets one `limited` line per tenant and limit and second, with the count, instead of a
line per refused request. (What a refusal costs in instructions: bench scenario s9_refusals.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import structlog

from proxy.http.keys import SERVICES
from tests.conftest import RunningProxy, StartProxy
from tests.e2e.test_transport_e2e import call_body, error_of, modern_headers

pytestmark = pytest.mark.e2e

FLOOD = 40


async def whoami(running: RunningProxy, tenant: str) -> tuple[int, dict[str, str], bytes]:
    return await running.post(
        call_body("whoami", {}), token=running.token(tenant), headers=modern_headers("tools/call", "whoami")
    )


async def test_a_flood_of_refusals_is_counted_audited_and_logged_in_aggregate(
    make_proxy: StartProxy, upstreams: dict[str, Any], tmp_path: Path
) -> None:
    running = await make_proxy(
        upstreams,
        tenants={
            "acme": {"upstream": {"url": upstreams["acme"].url}},
            "globex": {
                "upstream": {"url": upstreams["globex"].url},
                "limits": {"requests_per_second": 0.001, "burst": 1},
            },
        },
        audit={"dir": str(tmp_path / "audit")},
    )
    services = running.app[SERVICES]
    with structlog.testing.capture_logs() as logs:
        assert (await whoami(running, "globex"))[0] == 200  # its burst
        for _ in range(FLOOD):
            status, headers, body = await whoami(running, "globex")
            assert status == 429
            assert error_of(body)["code"] == -32009
            assert int(headers["Retry-After"]) >= 1
            assert (await whoami(running, "acme"))[0] == 200
        services.reports.run_now()
        services.limiter.refusals.flush()
    per_request = [line for line in logs if line.get("event") == "mcp_request"]
    assert {line["tenant"] for line in per_request} == {"acme", "globex"}
    assert len([line for line in per_request if line["tenant"] == "globex"]) == 1  # the served one
    limited = [line for line in logs if line.get("event") == "limited"]
    assert [(line["tenant"], line["limit"]) for line in limited] == [("globex", "rate")]
    assert sum(line["refused"] for line in limited) == FLOOD
    assert 'mcp_proxy_limited_total{limit="rate",tenant="globex"} 40.0' in services.metrics.render().decode()
    services.flush()
    records = [json.loads(line) for line in (tmp_path / "audit" / "globex.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in records].count("denied") == FLOOD
    assert {r["error_code"] for r in records if r["outcome"] == "denied"} == {-32009}
