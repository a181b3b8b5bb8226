"""What a loaded config turns into, and what outlives a config.

`Runtime` is everything derived from one config (authenticator, the tenant directory with each
tenant's upstream and tool catalog, origin rules): built before use, swapped as a whole.
`Services` hold state that spans configs (sessions). A request takes one Runtime reference when it
starts and keeps it.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from proxy.backends.redis.client import RedisState
from proxy.config import ConfigError, ProxyConfig
from proxy.layers.auth.authenticator import Authenticator
from proxy.layers.cache.backend import Cache
from proxy.layers.cache.store import ResponseCache
from proxy.layers.containment.audit import AuditLog
from proxy.layers.containment.request_state import RequestStateSeal
from proxy.layers.data_access.policy import load_policy
from proxy.layers.limits.backend import Limiter
from proxy.layers.limits.limiter import LocalLimiter
from proxy.layers.sessions.backend import SessionStore
from proxy.layers.sessions.registry import SessionRegistry
from proxy.layers.sessions.task_store import TaskStore
from proxy.ops.drain import Drain
from proxy.ops.metrics import Metrics
from proxy.ops.reports import Reports
from proxy.tenants.directory import SharedAllowlist, TenantDirectory
from proxy.tenants.templates import TenantResolver
from proxy.upstreams.base import Upstream

if TYPE_CHECKING:
    from proxy.ops.tracing import Tracing

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


@dataclass(eq=False)
class Runtime:
    config: ProxyConfig
    authenticator: Authenticator
    tenants: TenantDirectory
    origins: OriginPolicy
    metrics_token: bytes | None = None  # /metrics (and the admin endpoints) answer only this token
    # What it was built from: each file read (config, policies, key files) -> its sha256, and when.
    files: dict[str, str] = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.time)

    @classmethod
    def build(
        cls, config: ProxyConfig, previous: Runtime | None = None, shared: RedisState | None = None
    ) -> Runtime:
        """Everything a config needs, built before use (template tenants: on first use). A tenant
        whose upstream did not change keeps the previous runtime's upstream (its connections and
        processes) and catalog. `shared`: the replicas' Redis, for tenant_allowlist.redis_set."""
        resolver = TenantResolver(config)
        authenticator = Authenticator(config, tenants=resolver)
        policies = {
            name: (load_policy(config.policy_file(name)), _file_digest(config.policy_file(name)))
            for name in config.policy_names
        }
        files = {str(path): _file_digest(path) for path in config.watched_files}
        allowlist = _shared_allowlist(config, shared)
        before = previous.tenants if previous is not None else None
        tenants = TenantDirectory(config, resolver, policies, allowlist, before)
        origins = OriginPolicy.from_config(config)
        return cls(config, authenticator, tenants, origins, _metrics_token(config), files)

    def upstreams_not_in(self, other: Runtime) -> list[Upstream]:
        """Upstreams of this runtime that `other` does not use (to close once they are idle)."""
        kept = {id(t.upstream) for t in other.tenants}
        return [t.upstream for t in self.tenants if id(t.upstream) not in kept]

    def retire_bridges(self) -> None:
        """This runtime was replaced: what its bridges hold upstream ends (once its calls are done)."""
        for tenant in self.tenants:
            tenant.bridge.retire()

    async def close(self) -> None:
        for tenant in self.tenants:
            await tenant.bridge.close()
            await tenant.upstream.close()


class _NoSharedState:
    """tenant_allowlist.redis_set without a Redis to ask (a config only being checked): no
    template tenant can be admitted."""

    async def lists(self, tenant: str) -> bool | None:
        return None


def _shared_allowlist(config: ProxyConfig, shared: RedisState | None) -> SharedAllowlist | None:
    listed = config.tenant_allowlist
    if listed is None or listed.redis_set is None:
        return None
    if shared is None:
        return _NoSharedState()
    from proxy.backends.redis.allowlist import RedisAllowlist

    return RedisAllowlist(shared, listed.redis_set)


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
    drain: Drain = field(default_factory=Drain)  # exchanges in flight, and how far a stop has come
    tasks: TaskStore = field(default_factory=TaskStore)  # whose tasks the upstreams' task ids are
    tracing: Tracing | None = None  # tracing.enabled: the flows are built with its steps (http/endpoint.py)

    @classmethod
    def build(cls, config: ProxyConfig) -> Services:
        services = cls._build(config)
        if config.tracing.enabled:  # (only then is OpenTelemetry imported)
            from proxy.ops.tracing import Tracing

            services.tracing = Tracing(config.tracing)
        return services

    @classmethod
    def _build(cls, config: ProxyConfig) -> Services:
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

    def forget_tenants(self, tenants: set[str]) -> None:
        """What this process keeps per tenant id, for tenants it no longer serves (idle template
        tenants, tenants a reload removed): limits, recent audit records and open audit files,
        metrics series. Sessions and cache entries expire on their own."""
        for tenant in tenants:
            self.limiter.forget(tenant)
        self.audit.forget(tenants)
        self.metrics.forget(tenants)

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
        if self.tracing is not None:
            await self.tracing.shutdown()
