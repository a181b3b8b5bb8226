"""Every tenant's runtime under one config: built when first needed, dropped when idle.

    explicit    one TenantRuntime per `tenants` entry, built with the config
    templated   tenants a tenant template serves: built on their first request, dropped by the
                idle sweep once unused for the template's idle_seconds (no exchange holding them,
                no session in this replica), so memory follows active tenants, not possible ones

A TenantRuntime is what a tenant's requests use: its upstream (connection pool or processes), its
catalog, its policy and limits, and its cache identity. A reload builds a new directory; a tenant
whose upstream did not change keeps its upstream and catalog: explicit tenants, and template
tenants active at the reload whose template still serves them alike. With
`tenant_allowlist.redis_set`, a template tenant is admitted only once Redis lists it, and asked
again every `cache_seconds` while active; one admitted before stays served while Redis cannot be
reached, one never admitted is refused (503) until it can.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from proxy.bridge.tenant import TenantBridge
from proxy.config import LimitsConfig, ProxyConfig, TenantConfig
from proxy.layers.cache.store import tenant_budget
from proxy.layers.data_access.catalog import Catalog
from proxy.layers.data_access.policy import Policy
from proxy.protocol.errors import Forbidden, StateStoreUnavailable
from proxy.tenants.templates import NOT_SERVED, Template, TenantKey, TenantResolver
from proxy.types import TenantContext
from proxy.upstreams.base import Upstream
from proxy.upstreams.eras import UpstreamEras
from proxy.upstreams.http import HttpUpstream
from proxy.upstreams.stdio.upstream import StdioUpstream


@dataclass(eq=False)
class Usage:
    """How a tenant's runtime is used; shared by the runtimes a reload carries its upstream over to,
    so an exchange still running on the old one keeps the new one from being dropped under it."""

    in_use: int = 0  # exchanges holding it (tenants/stage.py)
    last_used: float = field(default_factory=time.monotonic)


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
    template: int | None = None  # the tenant template serving it; None: its own `tenants` entry
    idle_seconds: float | None = None  # dropped after this long unused; None: never (explicit)
    usage: Usage = field(default_factory=Usage)
    confirmed_until: float = 0.0  # tenant_allowlist.redis_set: served without asking until then
    # The protocol eras the upstream speaks, learned on first use: a reload learns them again.
    eras: UpstreamEras = field(default_factory=UpstreamEras)
    cache_budget: int | None = None  # the tenant's own share of the response cache, in bytes
    # Set when a reload removes the tenant, or moves it to another upstream (`moved`): its open
    # streams end at once, relaying nothing more of the upstream it no longer has.
    removed: asyncio.Event = field(default_factory=asyncio.Event)
    moved: bool = False

    @property
    def key(self) -> TenantKey:
        return (self.id, self.template)


def build_upstream(tenant_id: str, config: TenantConfig) -> Upstream:
    if config.upstream.url is not None:
        return HttpUpstream(tenant_id, config.upstream)
    return StdioUpstream(tenant_id, config.upstream)


class SharedAllowlist(Protocol):
    async def lists(self, tenant: str) -> bool | None:
        """Whether templates may serve `tenant`; None when that cannot be told now."""
        ...


class TenantDirectory:
    def __init__(
        self,
        config: ProxyConfig,
        resolver: TenantResolver,
        policies: Mapping[str, tuple[Policy, str]],  # name -> (policy, digest of its file)
        allowlist: SharedAllowlist | None = None,
        previous: TenantDirectory | None = None,
    ) -> None:
        self.config = config
        self.resolver = resolver
        self._policies = policies
        self._allowlist = allowlist
        listed = config.tenant_allowlist
        self._confirm_seconds = listed.cache_seconds if listed is not None else 0.0
        caching = config.cache  # each tenant's share; template tenants get an explicit tenant's share
        self._cache_budget = tenant_budget(
            caching.max_bytes, caching.max_entry_bytes, caching.max_bytes_per_tenant, len(config.tenants)
        )
        self.explicit: dict[str, TenantRuntime] = {}
        self._templated: dict[TenantKey, TenantRuntime] = {}
        for tenant_id, tenant_config in config.tenants.items():
            before = previous.explicit.get(tenant_id) if previous is not None else None
            self.explicit[tenant_id] = self._build(tenant_id, tenant_config, None, before)
        if previous is not None:
            self._carry_over(previous)

    def _build(
        self, tenant_id: str, config: TenantConfig, template: Template | None, before: TenantRuntime | None
    ) -> TenantRuntime:
        policy, digest = self._policies[config.policy] if config.policy is not None else (None, None)
        if before is not None and before.config.upstream == config.upstream:
            upstream, catalog, usage = before.upstream, before.catalog, before.usage
        else:
            upstream = build_upstream(tenant_id, config)
            catalog, usage = Catalog(upstream), Usage()
        scope_of = [config.upstream.model_dump(mode="json"), config.policy, digest]
        scope = hashlib.sha256(json.dumps(scope_of, sort_keys=True).encode()).hexdigest()[:16]
        eras = UpstreamEras()
        return TenantRuntime(
            tenant_id, config, upstream, catalog, policy, self.config.limits_of(config),
            TenantBridge(tenant_id, upstream, eras, catalog, self.config), f"{upstream.identity}#{scope}",
            eras=eras,
            template=template.index if template is not None else None,
            idle_seconds=template.config.idle_seconds if template is not None else None,
            usage=usage,
            cache_budget=self._cache_budget,
        )  # fmt: skip

    def _carry_over(self, previous: TenantDirectory) -> None:
        """Template tenants active before a reload that their template still serves alike keep
        their upstream (connections, processes, upstream sessions) and catalog."""
        for before in previous._templated.values():
            assert before.template is not None
            template = self.resolver.templates.at(before.template)
            if (
                before.id in self.explicit
                or template is None
                or template.pattern.fullmatch(before.id) is None
                or not self.resolver.allows(before.id)
            ):
                continue
            config = template.tenant_config(before.id)
            if config.upstream == before.config.upstream:
                self._templated[before.key] = self._build(before.id, config, template, before)

    async def for_caller(self, ctx: TenantContext) -> TenantRuntime:
        """The runtime serving an authenticated caller's tenant (the authenticator resolved which
        configuration serves it), built on the template tenant's first request."""
        if ctx.template is None:
            return self.explicit[ctx.tenant]
        key = (ctx.tenant, ctx.template)
        tenant = self._templated.get(key)
        now = time.monotonic()
        if tenant is None or (self._allowlist is not None and tenant.confirmed_until < now):
            tenant = await self._admit(key, tenant, now)
        tenant.usage.last_used = now
        return tenant

    async def _admit(self, key: TenantKey, known: TenantRuntime | None, now: float) -> TenantRuntime:
        tenant_id, index = key
        listed = await self._allowlist.lists(tenant_id) if self._allowlist is not None else True
        if listed is None and known is None:
            raise StateStoreUnavailable("The tenant cannot be admitted now: its allowlist is unreachable")
        if listed is False:
            raise Forbidden(NOT_SERVED)
        tenant = self._templated.get(key)  # a concurrent first request may have built it meanwhile
        if tenant is None:
            template = self.resolver.templates.at(index) if index is not None else None
            assert template is not None  # the authenticator resolved the key from this config
            tenant = self._build(tenant_id, template.tenant_config(tenant_id), template, None)
            self._templated[key] = tenant
        if listed:
            tenant.confirmed_until = now + self._confirm_seconds
        return tenant

    def drop_idle(self, now: float, has_sessions: Callable[[str], bool]) -> list[TenantRuntime]:
        """Forget template tenants nobody used for their idle_seconds; the caller closes their
        upstreams (a request arriving meanwhile builds a fresh runtime)."""
        idle = [
            tenant
            for tenant in self._templated.values()
            if tenant.usage.in_use == 0
            and tenant.idle_seconds is not None
            and now - tenant.usage.last_used > tenant.idle_seconds
            and not has_sessions(tenant.id)
        ]
        for tenant in idle:
            del self._templated[tenant.key]
        return idle

    def built(self, key: TenantKey) -> TenantRuntime | None:
        tenant_id, template = key
        return self.explicit.get(tenant_id) if template is None else self._templated.get(key)

    def of_tenant(self, tenant_id: str) -> TenantRuntime | None:
        """A runtime built for the tenant id (whichever configuration serves it), or None."""
        found = self.explicit.get(tenant_id)
        for index in range(len(self.resolver.templates.templates)):
            found = found or self._templated.get((tenant_id, index))
        return found

    def __iter__(self) -> Iterator[TenantRuntime]:
        """Every runtime built now: the explicit tenants and the active template tenants."""
        yield from self.explicit.values()
        yield from list(self._templated.values())

    def __len__(self) -> int:
        return len(self.explicit) + len(self._templated)
