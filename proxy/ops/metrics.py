"""Prometheus metrics. Label values are only served tenant ids (configured, or well-formed ids a
tenant template serves, while active), MCP method names, outcomes and rule names: never argument
values, tool output or anything else a client chose."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Collection, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from proxy.protocol.jsonrpc import KNOWN_METHODS, MessageKind

if TYPE_CHECKING:
    from proxy.flow import Exchange

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_METHODS = frozenset().union(*KNOWN_METHODS.values())
_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
)  # fmt: skip

Families = Callable[[], Iterable[Metric]]


def method_label(method: str | None) -> str:
    """A method name fit for a label: one the proxy knows, or a fixed stand-in."""
    if method is None:
        return "none"
    return method if method in _METHODS else "other"


class _GaugeCollector(Collector):
    """Families read from live state at scrape time, so requests pay nothing for them."""

    def __init__(self, families: Families) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families()


class _Histogram:
    """Bucket counts and a sum, as Prometheus histograms expose them."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(_LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(_LATENCY_BUCKETS, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        cumulative = 0
        out: list[tuple[str, float]] = []
        for bound, count in zip([*_LATENCY_BUCKETS, float("inf")], self.counts, strict=True):
            cumulative += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        return out


_LATENCY_FAMILIES = {
    "request": ("mcp_proxy_request_duration_seconds", "Whole request time in the proxy, upstream included"),
    "upstream": ("mcp_proxy_upstream_duration_seconds", "Time spent waiting for the upstream"),
    "overhead": ("mcp_proxy_overhead_seconds", "The proxy's own time per request (upstream time excluded)"),
}


class Metrics:
    """One registry per application, so two proxies in one process never mix their numbers."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        # Per-request figures are kept in plain counters and bucket arrays (the event loop is the
        # only writer, so no locks) and turned into Prometheus families when /metrics is scraped.
        # By tenant first, so what a tenant leaves behind (`forget`) goes in one step.
        self._requests: dict[str, dict[tuple[str, str], int]] = {}  # (method, outcome) -> count
        self._cache: dict[str, dict[str, int]] = {}  # cache state -> count
        self._latency: dict[str, dict[str, _Histogram]] = {}  # kind -> histogram
        self._limited: dict[str, dict[str, int]] = {}  # limit -> count (refusals cost next to nothing)
        registry.register(_GaugeCollector(self._request_families))
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
        self.rejected = Counter(
            "mcp_proxy_rejected_total", "Requests refused before a tenant was known, by HTTP status",
            ["status"], registry=registry,
        )  # fmt: skip
        self.state_errors = Counter(
            "mcp_proxy_state_errors_total", "Failed calls to the shared state backend (Redis), by operation",
            ["operation"], registry=registry,
        )  # fmt: skip
        self.reloads = Counter(
            "mcp_proxy_config_reloads_total", "Config reloads, by result (ok or invalid)",
            ["result"], registry=registry,
        )  # fmt: skip

    def observe_request(
        self,
        tenant: str,
        method: str | None,
        outcome: str,
        total_seconds: float,
        upstream_seconds: float | None,
        cache_state: str | None,
    ) -> None:
        """Everything one answered request of a tenant adds to the metrics."""
        requests = self._requests.get(tenant)
        if requests is None:
            requests = self._requests[tenant] = {}
        key = (method_label(method), outcome)
        requests[key] = requests.get(key, 0) + 1
        latency = self._latency.get(tenant)
        if latency is None:
            latency = self._latency[tenant] = {"request": _Histogram(), "overhead": _Histogram()}
        latency["request"].observe(total_seconds)
        if upstream_seconds is not None:
            upstream = latency.get("upstream")
            if upstream is None:
                upstream = latency["upstream"] = _Histogram()
            upstream.observe(upstream_seconds)
        latency["overhead"].observe(max(0.0, total_seconds - (upstream_seconds or 0.0)))
        if cache_state is not None:
            cache = self._cache.get(tenant)
            if cache is None:
                cache = self._cache[tenant] = {}
            cache[cache_state] = cache.get(cache_state, 0) + 1

    def count_limited(self, tenant: str, limit: str) -> None:
        """A request refused by one of the tenant's limits (rate, concurrency, circuit, processes)."""
        limited = self._limited.get(tenant)
        if limited is None:
            limited = self._limited[tenant] = {}
        limited[limit] = limited.get(limit, 0) + 1

    def forget(self, tenants: Collection[str]) -> None:
        """Drop the series of tenants this process no longer serves (removed by a reload, or idle
        template tenants): counters that come back later start again from zero, which Prometheus
        reads as a counter reset."""
        for tenant in tenants:
            self._requests.pop(tenant, None)
            self._cache.pop(tenant, None)
            self._latency.pop(tenant, None)
            self._limited.pop(tenant, None)
            for counter in (self.policy_denials, self.spoof_attempts, self.upstream_errors):
                counter.remove_by_labels({"tenant": tenant})

    def _request_families(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "mcp_proxy_requests",
            "MCP requests by tenant, method and outcome",
            labels=["tenant", "method", "outcome"],
        )
        for tenant, counts in self._requests.items():
            for (method, outcome), count in counts.items():
                requests.add_metric([tenant, method, outcome], count)
        yield requests
        cache = CounterMetricFamily(
            "mcp_proxy_cache_requests", "Cache use by tenant: hit, miss or bypass", labels=["tenant", "state"]
        )
        for tenant, states in self._cache.items():
            for state, count in states.items():
                cache.add_metric([tenant, state], count)
        yield cache
        limited = CounterMetricFamily(
            "mcp_proxy_limited", "Requests refused by a per-tenant limit, by tenant and limit",
            labels=["tenant", "limit"],
        )  # fmt: skip
        for tenant, limits in self._limited.items():
            for limit, count in limits.items():
                limited.add_metric([tenant, limit], count)
        yield limited
        for kind, (name, documentation) in _LATENCY_FAMILIES.items():
            family = HistogramMetricFamily(name, documentation, labels=["tenant"])
            for tenant, histograms in self._latency.items():
                histogram = histograms.get(kind)
                if histogram is not None:
                    family.add_metric([tenant], histogram.buckets(), histogram.sum)
            yield family

    def add_gauges(self, gauges: Families) -> None:
        self.registry.register(_GaugeCollector(gauges))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def observe(exchange: Exchange) -> None:
    """The done hook: what one exchange adds to the metrics (a refusal before any tenant was known
    counts by status only)."""
    metrics, ctx, message = exchange.services.metrics, exchange.ctx, exchange.message
    if ctx is None:
        metrics.rejected.labels(str(exchange.status)).inc()
        return
    metrics.observe_request(
        ctx.tenant,
        message.method if message is not None else None,
        exchange.outcome,
        exchange.duration_seconds,
        exchange.upstream_seconds if exchange.upstream_contacted else None,
        exchange.cache_state if message is not None and message.kind is MessageKind.REQUEST else None,
    )
