"""Prometheus metrics. Label values are only configured tenant ids, method names and rule names."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    """One registry per application, so two proxies in one process never mix their numbers."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.policy_denials = Counter(
            "mcp_proxy_policy_denials_total",
            "Requests refused by a policy rule, by tenant and rule",
            ["tenant", "rule"],
            registry=self.registry,
        )
        self.spoof_attempts = Counter(
            "mcp_proxy_spoof_attempts_total",
            "Requests that named another tenant (refused or rewritten), by tenant and rule",
            ["tenant", "rule"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
