"""Policy files (policies/NAME.yaml): schema, and compilation into a frozen `Policy` at load.

Globs and URI templates are compiled once; a bad file is a ConfigError naming the file and key.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator

from proxy.config import ConfigError, StrictModel, format_validation_error, read_yaml

TENANT_VARIABLE = "tenant"
_VARIABLE = re.compile(r"\{([+#./;?&]?)([A-Za-z_][A-Za-z0-9_]*)\}")


class TenantArgumentsSpec(StrictModel):
    names: tuple[str, ...] = ("tenant_id",)
    on_mismatch: Literal["reject", "rewrite"] = "reject"
    hide_from_schema: bool = False


class ToolsSpec(StrictModel):
    allow: tuple[str, ...] = ("*",)
    deny: tuple[str, ...] = ()
    cache_ttl_seconds: dict[str, float] = Field(default_factory=dict)

    @field_validator("cache_ttl_seconds")
    @classmethod
    def _positive(cls, ttls: dict[str, float]) -> dict[str, float]:
        for name, ttl in ttls.items():
            if ttl <= 0:
                raise ValueError(f"cache_ttl_seconds.{name} must be greater than 0")
        return ttls


class ResourcesSpec(StrictModel):
    tenant_uri_templates: tuple[str, ...] = ()


class RecentActivitySpec(StrictModel):
    enabled: bool = False
    max_records: int = Field(default=20, ge=1, le=200)


class PolicyFile(StrictModel):
    tenant_arguments: TenantArgumentsSpec = Field(default_factory=TenantArgumentsSpec)
    tools: ToolsSpec = Field(default_factory=ToolsSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    recent_activity: RecentActivitySpec = Field(default_factory=RecentActivitySpec)


@dataclass(frozen=True, slots=True)
class UriTemplate:
    """A tenant-scoped URI template: every URI of its scheme must match and name the caller."""

    source: str
    scheme: str  # lowercased
    pattern: re.Pattern[str]

    def tenant_of(self, uri: str) -> str | None:
        """The tenant a URI names under this template, or None when it does not match."""
        match = self.pattern.fullmatch(uri)
        return match.group(TENANT_VARIABLE) if match else None


def compile_uri_template(template: str) -> UriTemplate:
    """`notes://{tenant}/{path}`: {tenant} is one path segment; other variables match any path text."""
    scheme, sep, _ = template.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        raise ValueError(f"{template!r} must start with a URI scheme (e.g. notes://{{tenant}}/...)")
    parts: list[str] = [f"(?i:{re.escape(scheme)})"]
    position = len(scheme)
    tenant_seen = 0
    for match in _VARIABLE.finditer(template):
        parts.append(re.escape(template[position : match.start()]))
        operator, name = match.groups()
        if name == TENANT_VARIABLE:
            if operator:
                raise ValueError(f"{template!r}: {{tenant}} takes no operator")
            tenant_seen += 1
            parts.append(rf"(?P<{TENANT_VARIABLE}>[^/?#&]*)")
        else:
            parts.append(r"[^?#]*")
        position = match.end()
    parts.append(re.escape(template[position:]))
    if tenant_seen != 1:
        raise ValueError(f"{template!r} must contain {{tenant}} exactly once")
    if "{" in _VARIABLE.sub("", template) or "}" in _VARIABLE.sub("", template):
        raise ValueError(f"{template!r} has a malformed variable")
    regex = "".join(parts) + r"(?:[?#].*)?"
    return UriTemplate(template, scheme.lower(), re.compile(regex, re.DOTALL))


def _globs(patterns: tuple[str, ...]) -> re.Pattern[str]:
    if not patterns:
        return re.compile(r"(?!)")
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


@dataclass(frozen=True)
class Policy:
    name: str
    tenant_argument_names: frozenset[str]
    rewrite_mismatches: bool
    hide_from_schema: bool
    tool_allow: re.Pattern[str]
    tool_deny: re.Pattern[str]
    cache_ttl_seconds: Mapping[str, float]
    uri_templates: tuple[UriTemplate, ...]
    recent_activity_records: int  # 0: the proxy_recent_activity tool is off

    @property
    def scoped_schemes(self) -> frozenset[str]:
        return frozenset(t.scheme for t in self.uri_templates)

    def tool_allowed(self, name: str) -> bool:
        return self.tool_allow.match(name) is not None and self.tool_deny.match(name) is None

    def denying_rule(self, name: str) -> str | None:
        if self.tool_deny.match(name) is not None:
            return "tools.deny"
        if self.tool_allow.match(name) is None:
            return "tools.allow"
        return None


def compile_policy(name: str, spec: PolicyFile) -> Policy:
    return Policy(
        name=name,
        tenant_argument_names=frozenset(spec.tenant_arguments.names),
        rewrite_mismatches=spec.tenant_arguments.on_mismatch == "rewrite",
        hide_from_schema=spec.tenant_arguments.hide_from_schema,
        tool_allow=_globs(spec.tools.allow),
        tool_deny=_globs(spec.tools.deny),
        cache_ttl_seconds=dict(spec.tools.cache_ttl_seconds),
        uri_templates=tuple(compile_uri_template(t) for t in spec.resources.tenant_uri_templates),
        recent_activity_records=spec.recent_activity.max_records if spec.recent_activity.enabled else 0,
    )


def load_policy(path: Path) -> Policy:
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(path, "", "a policy must be a YAML mapping")
    try:
        spec = PolicyFile.model_validate(raw)
    except ValidationError as exc:
        raise format_validation_error(path, exc) from None
    for index, template in enumerate(spec.resources.tenant_uri_templates):
        try:
            compile_uri_template(template)
        except ValueError as exc:
            raise ConfigError(path, f"resources.tenant_uri_templates.{index}", str(exc)) from None
    return compile_policy(path.stem, spec)
