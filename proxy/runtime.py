"""What a loaded config turns into, and what outlives a config.

`Runtime` is everything derived from one config (authenticator, per-tenant upstreams and tool
catalogs, origin rules): built fully before use, swapped as a whole. `Services` hold state that
spans configs (sessions). A request takes one Runtime reference when it starts and keeps it.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from proxy.backends.redis.client import RedisState
from proxy.bridge.tenant import TenantBridge
from proxy.config import ConfigError, LimitsConfig, ProxyConfig, TenantConfig
from proxy.layers.auth.authenticator import Authenticator
from proxy.layers.cache.backend import Cache
from proxy.layers.cache.store import ResponseCache, tenant_budget
from proxy.layers.containment.audit import AuditLog
from proxy.layers.containment.request_state import RequestStateSeal
from proxy.layers.data_access.catalog import Catalog
from proxy.layers.data_access.policy import Policy, load_policy
from proxy.layers.limits.backend import Limiter
from proxy.layers.limits.limiter import LocalLimiter
from proxy.layers.sessions.backend import SessionStore
from proxy.layers.sessions.registry import SessionRegistry
from proxy.layers.sessions.task_store import TaskStore
from proxy.ops.metrics import Metrics
from proxy.ops.reports import Reports
from proxy.upstreams.base import Upstream
from proxy.upstreams.eras import UpstreamEras
from proxy.upstreams.http import HttpUpstream
from proxy.upstreams.stdio.upstream import StdioUpstream


@dataclass(eq=False)
class TenantRuntime:
    id: str
    config: TenantConfig
    upstream: Upstream
    catalog: Catalog
    policy: Policy | None
    limits: LimitsConfig
    # What stands in for the upstream when it speaks another protocol era than the client (bridge/).
    bridge: TenantBridge
    # The upstream as cache keys name it: its identity and a digest of the tenant's upstream config
    # and policy, so a result fetched under an older config (a request in flight across a reload,
    # an entry a failed invalidation left) is never found by requests on a newer one.
    # Deterministic, so replicas sharing Redis agree.
    cache_identity: str = ""
    # The protocol eras the upstream speaks, learned on first use: a reload learns them again.
    eras: UpstreamEras = field(default_factory=UpstreamEras)
    cache_budget: int | None = None  # the tenant's own share of the response cache, in bytes


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin_of(url: str) -> str:
    """scheme://host[:port] in lower case, without a trailing slash or the scheme's default port,
    which browsers never send (https://h:443 and https://h are one origin)."""
    text = url.strip().rstrip("/").lower()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:  # not a URL: compared as it is, so it matches nothing configured
        return text
    if not parts.scheme or not parts.netloc:
        return text
    netloc = parts.netloc  # userinfo kept: no browser sends it, so such an Origin matches nothing
    if port is not None and port == _DEFAULT_PORTS.get(parts.scheme):
        netloc = netloc[: netloc.rfind(":")]
    return f"{parts.scheme}://{netloc}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class OriginPolicy:
    """Which browser Origins may call (DNS-rebinding defence); requests without Origin pass."""

    allowed: frozenset[str]
    any_loopback: bool

    @classmethod
    def from_config(cls, config: ProxyConfig) -> OriginPolicy:
        allowed = {_origin_of(config.listen.resource_url)}
        allowed.update(_origin_of(origin) for origin in config.listen.allowed_origins)
        return cls(frozenset(allowed), _is_loopback(config.listen.host))

    def allows(self, origin: str) -> bool:
        normalized = _origin_of(origin)
        if normalized in self.allowed:
            return True
        if not self.any_loopback:
            return False
        parts = urlsplit(normalized)
        return parts.scheme in ("http", "https") and parts.hostname in ("localhost", "127.0.0.1", "::1")


def build_upstream(tenant_id: str, config: TenantConfig) -> Upstream:
    if config.upstream.url is not None:
        return HttpUpstream(tenant_id, config.upstream)
    return StdioUpstream(tenant_id, config.upstream)


@dataclass(eq=False)
class Runtime:
    config: ProxyConfig
    authenticator: Authenticator
    tenants: dict[str, TenantRuntime]
    origins: OriginPolicy
    metrics_token: bytes | None = None  # /metrics answers only this bearer token, when set

    @classmethod
    def build(cls, config: ProxyConfig, previous: Runtime | None = None) -> Runtime:
        """Everything a config needs, built before use. A tenant whose upstream did not change
        keeps the previous runtime's upstream (its connections and processes) and catalog."""
        authenticator = Authenticator(config)
        policies = {
            name: load_policy(config.policy_file(name))
            for name in sorted({t.policy for t in config.tenants.values() if t.policy is not None})
        }
        policy_digests = {name: _file_digest(config.policy_file(name)) for name in policies}
        tenants = {}
        caching = config.cache
        budget = tenant_budget(
            caching.max_bytes, caching.max_entry_bytes, caching.max_bytes_per_tenant, len(config.tenants)
        )
        for tenant_id, tenant_config in config.tenants.items():
            policy = policies[tenant_config.policy] if tenant_config.policy is not None else None
            before = previous.tenants.get(tenant_id) if previous is not None else None
            if before is not None and before.config.upstream == tenant_config.upstream:
                upstream, catalog = before.upstream, before.catalog
            else:
                upstream = build_upstream(tenant_id, tenant_config)
                catalog = Catalog(upstream)
            scope_of = [
                tenant_config.upstream.model_dump(mode="json"),
                tenant_config.policy,
                policy_digests.get(tenant_config.policy or ""),
            ]
            scope = hashlib.sha256(json.dumps(scope_of, sort_keys=True).encode()).hexdigest()[:16]
            eras = UpstreamEras()
            tenants[tenant_id] = TenantRuntime(
                tenant_id, tenant_config, upstream, catalog, policy, config.limits_for(tenant_id),
                TenantBridge(tenant_id, upstream, eras, catalog, config), f"{upstream.identity}#{scope}",
                eras, budget,
            )  # fmt: skip
        return cls(config, authenticator, tenants, OriginPolicy.from_config(config), _metrics_token(config))

    def upstreams_not_in(self, other: Runtime) -> list[Upstream]:
        """Upstreams of this runtime that `other` does not reuse (to close once they are idle)."""
        kept = {id(t.upstream) for t in other.tenants.values()}
        return [t.upstream for t in self.tenants.values() if id(t.upstream) not in kept]

    def retire_bridges(self) -> None:
        """This runtime was replaced: what its bridges hold upstream ends (once its calls are done)."""
        for tenant in self.tenants.values():
            tenant.bridge.retire()

    async def close(self) -> None:
        for tenant in self.tenants.values():
            await tenant.bridge.close()
            await tenant.upstream.close()


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:  # load_policy read it a moment ago; should it be gone, the scope still differs
        return "unreadable"


def _metrics_token(config: ProxyConfig) -> bytes | None:
    name = config.metrics.bearer_token_env
    if name is None:
        return None
    value = os.environ.get(name, "")
    if len(value) < 16:
        raise ConfigError(
            config.source,
            "metrics.bearer_token_env",
            f"environment variable {name} must hold a token of at least 16 characters",
        )
    return value.encode()


class RuntimeRef:
    """The current runtime. A reload replaces it whole; a request keeps the one it started with."""

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime


@dataclass(eq=False)
class Services:
    """State that outlives a config: in this process, or (state.backend: redis) shared by replicas."""

    sessions: SessionStore
    metrics: Metrics
    cache: Cache | None
    audit: AuditLog
    request_states: RequestStateSeal
    limiter: Limiter
    shutting_down: asyncio.Event
    shared: RedisState | None = None
    reports: Reports = field(default_factory=Reports)  # log lines, audit records, metrics
    tasks: TaskStore = field(default_factory=TaskStore)  # whose tasks the upstreams' task ids are

    @classmethod
    def build(cls, config: ProxyConfig) -> Services:
        metrics = Metrics()
        sessions, caching, audit = config.sessions, config.cache, config.audit
        if config.state.backend == "redis":
            from proxy.backends.redis.audit import RedisAuditSink
            from proxy.backends.redis.cache import RedisResponseCache
            from proxy.backends.redis.limits import RedisLimiter
            from proxy.backends.redis.sessions import RedisSessionRegistry
            from proxy.backends.redis.tasks import RedisTaskStore

            shared = RedisState(config.state, metrics, config.source)
            return cls(
                RedisSessionRegistry(
                    shared,
                    sessions.idle_timeout_seconds,
                    sessions.max_per_tenant,
                    sessions.answer_timeout_seconds,
                ),
                metrics,
                RedisResponseCache(shared, caching.max_entry_bytes, caching.max_bytes)
                if caching.enabled
                else None,
                AuditLog(audit.dir, audit.max_file_bytes, audit.backups, RedisAuditSink(shared)),
                RequestStateSeal(),  # until the replicas' common key is fetched: see `connect`
                RedisLimiter(shared),
                asyncio.Event(),
                shared,
                tasks=RedisTaskStore(shared),
            )
        return cls(
            SessionRegistry(
                sessions.idle_timeout_seconds, sessions.max_per_tenant, sessions.answer_timeout_seconds
            ),
            metrics,
            ResponseCache(caching.max_bytes, caching.max_entry_bytes) if caching.enabled else None,
            AuditLog(audit.dir, audit.max_file_bytes, audit.backups),
            RequestStateSeal(),
            LocalLimiter(),
            asyncio.Event(),
        )

    async def connect(self) -> None:
        """With shared state: fetch what replicas must agree on (the request-state key), once Redis
        answers; called at start-up and by the readiness loop until it has succeeded."""
        if self.shared is None:
            return
        if not await self.shared.ping():
            return
        if not self.request_states.shared:
            key = await self.shared.seal_key()
            if key is not None:
                self.request_states.rekey(key)

    def flush(self) -> None:
        """Run every pending report and wait until the audit trail holds their records."""
        self.reports.run_now()
        self.audit.flush()

    async def close(self) -> None:
        self.reports.run_now()
        self.limiter.refusals.flush()
        self.audit.close()
        if self.shared is not None:
            await self.shared.close()
