"""Which configuration serves a token's tenant: its own `tenants` entry, or a tenant template.

A template serves a tenant id no `tenants` entry names when its `match` (a regular expression)
matches the whole id and the verified token's claims meet its `claims` conditions; the first such
template wins. The tenant's configuration is the template's with `{tenant}` replaced by the id in
the upstream's url, header values, command, env values and cwd. Ids are `[A-Za-z0-9._-]` and never
begin with a dot, so a substituted id adds no URL delimiter, no argument and no path component
beyond its own name. With `tenant_allowlist.file`, templates serve only the ids the file lists.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.config import (
    TENANT_ID_PATTERN,
    ClaimValue,
    ProxyConfig,
    TenantConfig,
    TenantTemplateConfig,
    UpstreamConfig,
)
from proxy.tenants.allowlist import read_allowlist

PLACEHOLDER = "{tenant}"
_TENANT_ID = re.compile(TENANT_ID_PATTERN)
TenantKey = tuple[str, int | None]  # (tenant id, template index; None: its own `tenants` entry)
NOT_SERVED = "Forbidden: the token does not name a tenant served by this proxy"


def claim_at(claims: Mapping[str, Any], dotted: str) -> Any:
    """The claim at a dotted path (`org.plan`), or None."""
    node: Any = claims
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _meets(value: Any, wanted: ClaimValue | tuple[ClaimValue, ...]) -> bool:
    """Equal in value and JSON type (true is not 1, "1" is not 1), to the value or one of a list."""
    choices = wanted if isinstance(wanted, tuple) else (wanted,)
    return any(type(value) is type(choice) and value == choice for choice in choices)


def substitute(upstream: UpstreamConfig, tenant: str) -> UpstreamConfig:
    """The template's upstream for one tenant: `{tenant}` replaced where it may stand."""

    def fill(text: str) -> str:
        return text.replace(PLACEHOLDER, tenant)

    update: dict[str, Any] = {
        "headers": {name: fill(value) for name, value in upstream.headers.items()},
        "env": {name: fill(value) for name, value in upstream.env.items()},
    }
    if upstream.url is not None:
        update["url"] = fill(upstream.url)
    if upstream.command is not None:
        update["command"] = tuple(fill(part) for part in upstream.command)
    if upstream.cwd is not None:
        update["cwd"] = Path(fill(str(upstream.cwd)))
    return upstream.model_copy(update=update)


@dataclass(frozen=True, slots=True)
class Template:
    index: int
    config: TenantTemplateConfig
    pattern: re.Pattern[str]
    # The one configuration of all its tenants when the upstream names no tenant (a shared server
    # that takes the tenant from the trusted tenant header or an argument): not copied per tenant.
    shared: TenantConfig | None = None

    @classmethod
    def compile(cls, index: int, config: TenantTemplateConfig) -> Template:
        template = cls(index, config, re.compile(config.match))
        if PLACEHOLDER in config.upstream.model_dump_json():
            return template
        return cls(index, config, template.pattern, template.tenant_config(""))

    def matches(self, tenant: str, claims: Mapping[str, Any] | None) -> bool:
        """The id fits `match`, and the claims (None: not known, as for tools without a token)
        meet every condition."""
        if self.pattern.fullmatch(tenant) is None:
            return False
        if claims is None:
            return True
        return all(_meets(claim_at(claims, path), wanted) for path, wanted in self.config.claims.items())

    def tenant_config(self, tenant: str) -> TenantConfig:
        """The configuration the template gives `tenant` (validated already, as the template was)."""
        if self.shared is not None:
            return self.shared
        return TenantConfig.model_construct(
            upstream=substitute(self.config.upstream, tenant),
            policy=self.config.policy,
            limits=self.config.limits,
        )


class TenantTemplates:
    def __init__(self, templates: Sequence[TenantTemplateConfig]) -> None:
        self.templates = tuple(Template.compile(i, t) for i, t in enumerate(templates))

    def match(self, tenant: str, claims: Mapping[str, Any] | None) -> Template | None:
        """The first template serving `tenant` (a well-formed id only) for a token with `claims`."""
        if not self.templates or _TENANT_ID.fullmatch(tenant) is None:
            return None
        return next((t for t in self.templates if t.matches(tenant, claims)), None)

    def at(self, index: int) -> Template | None:
        return self.templates[index] if 0 <= index < len(self.templates) else None

    def config_for_id(self, tenant: str) -> TenantConfig | None:
        template = self.match(tenant, None)
        return template.tenant_config(tenant) if template is not None else None


class TenantResolver:
    """Decides, at authentication, which configuration serves a token's tenant (or none: 403)."""

    def __init__(self, config: ProxyConfig) -> None:
        self.explicit = frozenset(config.tenants)
        self.templates = TenantTemplates(config.tenant_templates)
        listed = config.tenant_allowlist.file if config.tenant_allowlist is not None else None
        self.allowlist = read_allowlist(listed, config.source) if listed is not None else None

    def allows(self, tenant: str) -> bool:
        """Whether the allowlist file (if any) lets templates serve `tenant`."""
        return self.allowlist is None or tenant in self.allowlist

    def resolve(self, tenant: str, claims: Mapping[str, Any]) -> TenantKey | None:
        if tenant in self.explicit:
            return (tenant, None)
        template = self.templates.match(tenant, claims)
        if template is None or not self.allows(tenant):
            return None
        return (tenant, template.index)
