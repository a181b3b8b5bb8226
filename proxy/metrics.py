"""Prometheus metrics. Label values are only configured tenant ids, MCP method names, outcomes and
rule names: never argument values, tool output or anything else a client chose."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from proxy.jsonrpc import KNOWN_METHODS

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_METHODS = frozenset().union(*KNOWN_METHODS.values())
_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)  # fmt: skip

Gauges = Callable[[], Iterable[GaugeMetricFamily]]


def method_label(method: str | None) -> str:
    """A method name fit for a label: one the proxy knows, or a fixed stand-in."""
    if method is None:
        return "none"
    return method if method in _METHODS else "other"


class _GaugeCollector(Collector):
    """Gauges read from live state at scrape time, so requests pay nothing for them."""

    def __init__(self, gauges: Gauges) -> None:
        self._gauges = gauges

    def collect(self) -> Iterable[GaugeMetricFamily]:
        return self._gauges()


class Metrics:
    """One registry per application, so two proxies in one process never mix their numbers."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "mcp_proxy_requests_total", "MCP requests by tenant, method and outcome",
            ["tenant", "method", "outcome"], registry=registry,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "mcp_proxy_request_duration_seconds", "Whole request time in the proxy, upstream included",
            ["tenant"], buckets=_LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.upstream_seconds = Histogram(
            "mcp_proxy_upstream_duration_seconds", "Time spent waiting for the upstream",
            ["tenant"], buckets=_LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.overhead_seconds = Histogram(
            "mcp_proxy_overhead_seconds", "The proxy's own time per request (upstream time excluded)",
            ["tenant"], buckets=_LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.cache_requests = Counter(
            "mcp_proxy_cache_requests_total", "Cache use by tenant: hit, miss or bypass",
            ["tenant", "state"], registry=registry,
        )  # fmt: skip
        self.policy_denials = Counter(
            "mcp_proxy_policy_denials_total", "Requests refused by a policy rule, by tenant and rule",
            ["tenant", "rule"], registry=registry,
        )  # fmt: skip
        self.spoof_attempts = Counter(
            "mcp_proxy_spoof_attempts_total",
            "Requests that named another tenant (refused or rewritten), by tenant and rule",
            ["tenant", "rule"], registry=registry,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "mcp_proxy_upstream_errors_total", "Upstream failures by tenant: error, timeout or circuit_open",
            ["tenant", "kind"], registry=registry,
        )  # fmt: skip
        self.limited = Counter(
            "mcp_proxy_limited_total", "Requests refused by a per-tenant limit, by tenant and limit",
            ["tenant", "limit"], registry=registry,
        )  # fmt: skip
        self.rejected = Counter(
            "mcp_proxy_rejected_total", "Requests refused before a tenant was known, by HTTP status",
            ["status"], registry=registry,
        )  # fmt: skip
        self.reloads = Counter(
            "mcp_proxy_config_reloads_total", "Config reloads, by result (ok or invalid)",
            ["result"], registry=registry,
        )  # fmt: skip

    def add_gauges(self, gauges: Gauges) -> None:
        self.registry.register(_GaugeCollector(gauges))

    def render(self) -> bytes:
        return generate_latest(self.registry)
