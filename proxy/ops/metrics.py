"""Prometheus metrics. Label values are only served tenant ids (configured, or well-formed ids a
tenant template serves, while active), MCP method names, outcomes, rule names and the proxy's own
words (Redis operations, stream kinds): never argument values, tool output or anything else a
client chose. The process's own figures (process_*, python_*) come from
prometheus_client's collectors; gauges of live state are read at scrape time (ops/runtime_metrics.py)."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Collection, Iterable
from typing import TYPE_CHECKING

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    generate_latest,
)
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
        # (tenant, method, outcome, HTTP status // 100) -> answered requests: one count per request,
        # summed into the requests and responses families when scraped.
        self._requests: dict[tuple[str, str, str, int], int] = {}
        self._cache: dict[tuple[str, str], int] = {}
        self._latency: dict[tuple[str, str], _Histogram] = {}
        self._limited: dict[tuple[str, str], int] = {}  # a flood of refusals counts for next to nothing
        self._state_calls: dict[str, _Histogram] = {}  # Redis round trips, by operation
        self.loop_lag = _Histogram()  # how late the event loop ran a timer (ops/runtime_metrics.py)
        self.open_streams: dict[tuple[str, str], int] = {}  # (tenant, get | listen) -> streams open now
        registry.register(_GaugeCollector(self._request_families))
        registry.register(_GaugeCollector(self._runtime_families))
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            registry.register(collector)  # (they read the process when scraped; any registry may hold them)
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
        for result in ("ok", "invalid"):  # at 0 from the start: an alert's increase() sees the first one
            self.reloads.labels(result)

    def observe_request(
        self,
        tenant: str,
        method: str | None,
        outcome: str,
        total_seconds: float,
        upstream_seconds: float | None,
        cache_state: str | None,
        status: int = 200,
    ) -> None:
        """Everything one answered request of a tenant adds to the metrics."""
        key = (tenant, method_label(method), outcome, status // 100)
        self._requests[key] = self._requests.get(key, 0) + 1
        self._histogram("request", tenant).observe(total_seconds)
        if upstream_seconds is not None:
            self._histogram("upstream", tenant).observe(upstream_seconds)
        self._histogram("overhead", tenant).observe(max(0.0, total_seconds - (upstream_seconds or 0.0)))
        if cache_state is not None:
            cache_key = (tenant, cache_state)
            self._cache[cache_key] = self._cache.get(cache_key, 0) + 1

    def count_limited(self, tenant: str, limit: str) -> None:
        """A request refused by one of the tenant's limits (rate, concurrency, circuit, processes)."""
        key = (tenant, limit)
        self._limited[key] = self._limited.get(key, 0) + 1

    def forget(self, tenants: Collection[str]) -> None:
        """Drop the series of tenants this process no longer serves (removed by a reload, or idle
        template tenants): counters that come back later start again from zero, which Prometheus
        reads as a counter reset. (Rare: a walk over the keys is fine.)"""
        gone = set(tenants)
        for request_key in [key for key in self._requests if key[0] in gone]:
            del self._requests[request_key]
        for table in (self._cache, self._limited):
            for key in [key for key in table if key[0] in gone]:
                del table[key]
        for latency_key in [key for key in self._latency if key[1] in gone]:
            del self._latency[latency_key]
        for key in [key for key, count in self.open_streams.items() if key[0] in gone and count == 0]:
            del self.open_streams[key]
        for tenant in gone:
            for counter in (self.policy_denials, self.spoof_attempts, self.upstream_errors):
                counter.remove_by_labels({"tenant": tenant})

    def observe_state_call(self, operation: str, seconds: float) -> None:
        """One Redis round trip (operation: a fixed name of the proxy's, never a key)."""
        histogram = self._state_calls.get(operation)
        if histogram is None:
            histogram = self._state_calls[operation] = _Histogram()
        histogram.observe(seconds)

    def stream_opened(self, tenant: str, kind: str) -> None:
        key = (tenant, kind)
        self.open_streams[key] = self.open_streams.get(key, 0) + 1

    def stream_closed(self, tenant: str, kind: str) -> None:
        key = (tenant, kind)
        self.open_streams[key] = max(0, self.open_streams.get(key, 0) - 1)

    def _histogram(self, kind: str, tenant: str) -> _Histogram:
        histogram = self._latency.get((kind, tenant))
        if histogram is None:
            histogram = self._latency[(kind, tenant)] = _Histogram()
        return histogram

    def _request_families(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "mcp_proxy_requests",
            "MCP requests by tenant, method and outcome",
            labels=["tenant", "method", "outcome"],
        )
        by_method: dict[tuple[str, str, str], int] = {}
        by_status: dict[tuple[str, int], int] = {}
        for (tenant, method, outcome, status_class), count in self._requests.items():
            by_method[(tenant, method, outcome)] = by_method.get((tenant, method, outcome), 0) + count
            by_status[(tenant, status_class)] = by_status.get((tenant, status_class), 0) + count
        for request_labels, count in by_method.items():
            requests.add_metric(list(request_labels), count)
        yield requests
        responses = CounterMetricFamily(
            "mcp_proxy_responses",
            "Answers to a tenant's requests by HTTP status class (2xx, 4xx, 5xx; an error inside an SSE "
            "stream or a 200 JSON-RPC error counts as its HTTP status)",
            labels=["tenant", "status_class"],
        )
        for (tenant, status_class), count in by_status.items():
            responses.add_metric([tenant, f"{status_class}xx"], count)
        yield responses
        cache = CounterMetricFamily(
            "mcp_proxy_cache_requests", "Cache use by tenant: hit, miss or bypass", labels=["tenant", "state"]
        )
        for cache_labels, count in self._cache.items():
            cache.add_metric(list(cache_labels), count)
        yield cache
        limited = CounterMetricFamily(
            "mcp_proxy_limited", "Requests refused by a per-tenant limit, by tenant and limit",
            labels=["tenant", "limit"],
        )  # fmt: skip
        for limited_labels, count in self._limited.items():
            limited.add_metric(list(limited_labels), count)
        yield limited
        for kind, (name, documentation) in _LATENCY_FAMILIES.items():
            family = HistogramMetricFamily(name, documentation, labels=["tenant"])
            for (histogram_kind, tenant), histogram in self._latency.items():
                if histogram_kind == kind:
                    family.add_metric([tenant], histogram.buckets(), histogram.sum)
            yield family

    def _runtime_families(self) -> Iterable[Metric]:
        lag = HistogramMetricFamily(
            "mcp_proxy_event_loop_lag_seconds",
            "How late the event loop ran a timer it was due to run (every request waits as long)",
        )
        lag.add_metric([], self.loop_lag.buckets(), self.loop_lag.sum)
        yield lag
        calls = HistogramMetricFamily(
            "mcp_proxy_state_call_duration_seconds",
            "Round trips to the shared state backend (Redis), by operation",
            labels=["operation"],
        )
        for operation, histogram in self._state_calls.items():
            calls.add_metric([operation], histogram.buckets(), histogram.sum)
        yield calls

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
        exchange.status,
    )
