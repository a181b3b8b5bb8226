"""deploy/grafana-dashboard.json and deploy/prometheus-rules.yaml name only what the proxy exports.

The metric names are read from a running proxy's /metrics (Redis state, cache, limits and circuit
breaker configured, after a call and a session: every family it has), and every PromQL expression
of the rules and every query of the dashboard may name only those; the dashboard shows every
family of the proxy's own. Where promtool is installed, it checks the rule file and runs unit tests
that make each alert fire from series as the proxy exports them (skipped otherwise).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import StartProxy
from tests.e2e.test_transport_e2e import call_body, initialize, modern_headers
from tests.redis_server import RedisServer, started_redis_server

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus-rules.yaml"
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"

# PromQL's own words (besides function names, which are followed by a parenthesis).
PROMQL_WORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# --- reading expressions and /metrics -------------------------------------------------------------


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana query) selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # labels
    names = set()
    for match in re.finditer(r"(?<![\w$.])([A-Za-z_:][\w:]*)(\s*\()?", text):
        word, called = match.groups()
        if not called and word not in PROMQL_WORDS:
            names.add(word)
    return names


def rule_expressions() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule.get("alert") or rule["record"]: rule["expr"] for group in groups for rule in group["rules"]}


def dashboard_queries() -> dict[str, str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries[f"{panel['title']} / {target['refId']}"] = target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["query"]["query"])
            assert found, variable["query"]
            queries[f"${variable['name']}"] = found.group(1)
    return queries


def exported_names(exposition: str) -> set[str]:
    """Every series name a /metrics text can hold: families with no sample yet included."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names.update(name + suffix for suffix in HISTOGRAM_SUFFIXES)
        elif line and not line.startswith("#"):
            names.add(re.match(r"[A-Za-z_:][\w:]*", line).group(0))  # type: ignore[union-attr]
    return names


def unexported(expressions: dict[str, str], exported: set[str]) -> list[str]:
    """What is wrong with the expressions: a name the proxy does not export, or no name at all."""
    problems = []
    for where, expr in expressions.items():
        names = metric_names(expr)
        if not names:
            problems.append(f"{where}: names no metric")
        problems += [f"{where}: {name} is not exported" for name in sorted(names - exported)]
    return problems


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from started_redis_server()


async def scraped(make_proxy: StartProxy, upstreams: dict[str, Any], redis: RedisServer) -> str:
    """/metrics of a proxy with every feature that has metrics in use."""
    running = await make_proxy(
        upstreams,
        policies={"acme": {"tools": {"cache_ttl_seconds": {"whoami": 30}}}},
        state={"backend": "redis", "url": redis.url},
        limits={"requests_per_second": 100, "max_concurrent": 10, "circuit_failures": 3, "max_streams": 4},
    )
    for _ in range(2):  # a miss, then a hit
        status, _, _ = await running.post(
            call_body("whoami", {}),
            token=running.token("acme"),
            headers=modern_headers("tools/call", "whoami"),
        )
        assert status == 200
    await initialize(running, running.token("globex"))
    async with aiohttp.ClientSession() as http, http.get(running.metrics_url) as response:
        assert response.status == 200
        return await response.text()


# --- the checks -----------------------------------------------------------------------------------


@pytest.mark.e2e
async def test_the_rules_and_the_dashboard_name_only_metrics_the_proxy_exports(
    make_proxy: StartProxy, upstreams: dict[str, Any], redis_server: RedisServer
) -> None:
    exposition = await scraped(make_proxy, upstreams, redis_server)
    exported = exported_names(exposition)
    # A counter an alert takes increase() of is there at 0 before its first event (else the first
    # event would be the series' first sample, and no increase).
    assert 'mcp_proxy_config_reloads_total{result="invalid"} 0.0' in exposition
    assert {
        "mcp_proxy_state_up",
        "mcp_proxy_event_loop_lag_seconds_bucket",
        "process_cpu_seconds_total",
    } <= exported
    rules, queries = rule_expressions(), dashboard_queries()
    assert set(rules) >= {
        "McpProxyStateBackendDown", "McpProxyCircuitOpen", "McpProxyHigh5xxRate",
        "McpProxyTenantThrottled", "McpProxyReloadFailed", "McpProxyEventLoopLag",
    }  # fmt: skip
    assert unexported(rules, exported) == []
    assert unexported(queries, exported) == []
    # The dashboard shows every family of the proxy's own.
    shown = set().union(*(metric_names(expr) for expr in queries.values()))
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in shown}
    own = {
        name
        for name in exported
        if name.startswith("mcp_proxy_") and not name.endswith((*HISTOGRAM_SUFFIXES, "_created"))
    }
    assert sorted(own - families - shown) == []


def test_the_check_catches_a_name_the_proxy_does_not_export() -> None:
    exported = {"mcp_proxy_requests_total", "mcp_proxy_request_duration_seconds_bucket"}
    assert (
        unexported({"ok": 'sum by (tenant) (rate(mcp_proxy_requests_total{job=~"$job"}[5m]))'}, exported)
        == []
    )
    assert unexported({"typo": "rate(mcp_proxy_request_total[5m]) > 1"}, exported) == [
        "typo: mcp_proxy_request_total is not exported"
    ]
    assert unexported({"none": "vector(1)"}, exported) == ["none: names no metric"]
    assert metric_names(
        "histogram_quantile(0.99, sum by (le, instance) "
        "(rate(mcp_proxy_request_duration_seconds_bucket[5m]))) "
        '> 0.1 and on (job) up{job="x"} offset 5m'
    ) == {"mcp_proxy_request_duration_seconds_bucket", "up"}


def test_the_dashboard_is_grafana_json_on_a_chosen_prometheus() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]


# --- promtool ------------------------------------------------------------------------------------


def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return binary


def test_promtool_accepts_the_rules() -> None:
    done = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def render(template: str, labels: dict[str, str], value: str) -> str:
    """An annotation as Prometheus renders it, for the templates the rule file uses."""
    text = re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels[m.group(1)], template)
    return re.sub(r"\{\{\s*\$value[^}]*\}\}", value, text)


def alert_test(
    alert: str, at: str, series: dict[str, str], labels: dict[str, str], value: str = ""
) -> dict[str, Any]:
    """A promtool alert test: from `series`, `alert` fires at `at` with `labels` (and not a minute
    into the series, before any `for:` could have passed)."""
    rule = next(
        r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if r.get("alert") == alert
    )
    all_labels = {**labels, **rule.get("labels", {})}
    annotations = {key: render(text, all_labels, value) for key, text in rule["annotations"].items()}
    return {
        "interval": "1m",
        "input_series": [{"series": name, "values": values} for name, values in series.items()],
        "alert_rule_test": [
            {"eval_time": "1m", "alertname": alert, "exp_alerts": []},
            {
                "eval_time": at,
                "alertname": alert,
                "exp_alerts": [{"exp_labels": all_labels, "exp_annotations": annotations}],
            },
        ],
    }


def alert_tests() -> Iterable[dict[str, Any]]:
    at = {"job": "proxy", "instance": "10.0.0.1:9464"}
    series = '{job="proxy",instance="10.0.0.1:9464"'
    yield alert_test("McpProxyStateBackendDown", "4m", {f"mcp_proxy_state_up{series}}}": "1 1 0 0 0 0"}, at)
    yield alert_test(
        "McpProxyCircuitOpen", "4m",
        {f'mcp_proxy_circuit_open{series},tenant="acme"}}': "0 0 1 1 1 1",
         f'mcp_proxy_circuit_open{series},tenant="globex"}}': "0 0 0 0 0 0"},
        {"job": "proxy", "tenant": "acme"},
    )  # fmt: skip
    yield alert_test(
        "McpProxyHigh5xxRate", "15m",
        {f'mcp_proxy_responses_total{series},tenant="acme",status_class="2xx"}}': "0+60x20",
         f'mcp_proxy_responses_total{series},tenant="acme",status_class="5xx"}}': "0+6x20"},
        {"job": "proxy"}, "9.091%",
    )  # fmt: skip
    yield alert_test(
        "McpProxyTenantThrottled", "20m",
        {f'mcp_proxy_limited_total{series},tenant="acme",limit="rate"}}': "0+60x30",
         f'mcp_proxy_limited_total{series},tenant="globex",limit="circuit"}}': "0+600x30"},
        {"job": "proxy", "tenant": "acme", "limit": "rate"},
    )  # fmt: skip
    yield alert_test(
        "McpProxyReloadFailed", "5m",
        {f'mcp_proxy_config_reloads_total{series},result="invalid"}}': "0 0 0 1 1 1",
         f'mcp_proxy_config_reloads_total{series},result="ok"}}': "0 1 2 2 2 2"},
        {**at, "result": "invalid"},
    )  # fmt: skip
    yield alert_test(
        "McpProxyEventLoopLag", "20m",
        {f'mcp_proxy_event_loop_lag_seconds_bucket{series},le="0.05"}}': "0+4x30",
         f'mcp_proxy_event_loop_lag_seconds_bucket{series},le="0.25"}}': "0+8x30",
         f'mcp_proxy_event_loop_lag_seconds_bucket{series},le="+Inf"}}': "0+8x30"},
        at, "246ms",
    )  # fmt: skip


def test_each_alert_fires_from_the_series_the_proxy_exports(tmp_path: Path) -> None:
    tests = tmp_path / "rules.test.yaml"
    tests.write_text(
        yaml.safe_dump(
            {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": list(alert_tests())}
        )
    )
    done = subprocess.run(
        [promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
