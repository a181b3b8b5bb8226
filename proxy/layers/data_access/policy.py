"""Policy files (policies/NAME.yaml): schema, and compilation into a frozen `Policy` at load.

Globs and URI templates are compiled once; a bad file is a ConfigError naming the file and key.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import Field, ValidationError, field_validator

from proxy.config import ConfigError, StrictModel, format_validation_error, read_yaml
from proxy.layers.data_access.public_uris import (
    NO_PUBLIC_URIS,
    PublicUris,
    compile_public_uri,
    compile_public_uris,
)
from proxy.types import JsonObject

TENANT_VARIABLE = "tenant"
_VARIABLE = re.compile(r"\{([+#./;?&]?)([A-Za-z_][A-Za-z0-9_]*)\}")


class TenantArgumentsSpec(StrictModel):
    """Arguments that name a tenant: they must name the caller's own."""

    names: tuple[str, ...] = Field(
        default=("tenant_id",),
        description="Argument names that identify a tenant, checked at any depth of tools/call, "
        "prompts/get and completion arguments (and inside JSON documents sent as strings).",
    )
    on_mismatch: Literal["reject", "rewrite"] = Field(
        default="reject",
        description="What a tenant argument naming anything but the caller's tenant gets: refused "
        "(reject) or replaced by the caller's tenant (rewrite); either way counted as a spoof.",
    )
    hide_from_schema: bool = Field(
        default=False,
        description="Drop tenant arguments from the schemas clients see (tools/list, prompts/list, "
        "$defs included); the proxy fills them in.",
    )
    json_document_tools: tuple[str, ...] = Field(
        default=(),
        description="Glob patterns of tools whose string arguments carry JSON documents of their own: "
        "the proxy does not look for tenant arguments inside strings their schema declares as strings "
        "(it still does where the schema says the value is not a string, which SDKs decode).",
    )


class ToolsSpec(StrictModel):
    """Which tools the tenant may see and call, and which tools' results are cached."""

    allow: tuple[str, ...] = Field(
        default=("*",),
        description="Glob patterns of the tools the tenant may see and call (fnmatch: *, ?, [...]).",
    )
    deny: tuple[str, ...] = Field(
        default=(),
        description="Glob patterns of tools refused even when allowed: they vanish from tools/list and "
        "a call gets -32005.",
    )
    cache_ttl_seconds: dict[str, float] = Field(
        default_factory=dict,
        description="Tool name -> seconds its tools/call results are cached. One entry per tenant, shared "
        "by all the tenant's users (whatever their issuer and subject): name only tools whose result "
        "does not depend on who calls. Never stored: errors, isError, input_required and task results, "
        "and a result whose exchange involved a server-to-client request (elicitation, sampling, "
        "roots). A tool not named here is never cached by tool.",
    )

    @field_validator("cache_ttl_seconds")
    @classmethod
    def _positive(cls, ttls: dict[str, float]) -> dict[str, float]:
        for name, ttl in ttls.items():
            if ttl <= 0:
                raise ValueError(f"cache_ttl_seconds.{name} must be greater than 0")
        return ttls


class ResourcesSpec(StrictModel):
    """Which resource URIs belong to which tenant."""

    tenant_uri_templates: tuple[str, ...] = Field(
        default=(),
        description="URI templates such as notes://{tenant}/{path}: a URI of a scheme listed here must "
        "match one and name the caller's tenant, or it is answered as an unknown resource; lists drop "
        "other tenants' entries.",
    )
    public_uris: tuple[str, ...] = Field(
        default=(),
        description="Glob patterns of URIs in those schemes that every tenant of the upstream shares "
        "(documentation, schemas): they are read, listed and subscribed to although no template names "
        "a tenant in them. `*` matches within one path segment, `**` across segments; neither matches "
        "`?` or `#`, and everything else is literal. The scheme and authority are literal, no "
        "{variables}. A URI a template's tenant part could claim (one starting with the template's "
        "text before its first variable, in any case) is never public; nor is one with dot segments, "
        "backslashes, whitespace or percent-encoded ASCII (a space excepted).",
    )


RootsSetting = Literal["deny", "allow"] | tuple[str, ...]


class ClientCapabilitiesSpec(StrictModel):
    """What the upstream may learn of, and ask from, the client (both protocol eras)."""

    roots: RootsSetting = Field(
        default="deny",
        description="deny: the upstream never sees the client's roots (a roots/list is answered with "
        "an empty list); allow: passed through; a list of URIs (may contain {tenant}): the proxy "
        "answers roots/list with them.",
    )
    sampling: Literal["allow", "deny"] = Field(
        default="allow",
        description="deny: the sampling capability is removed and an upstream's sampling request is "
        "refused with a JSON-RPC error.",
    )
    elicitation: Literal["allow", "deny"] = Field(
        default="allow",
        description="deny: the elicitation capability is removed and an upstream's elicitation "
        "request is refused with a JSON-RPC error.",
    )

    @field_validator("roots")
    @classmethod
    def _root_uris(cls, roots: RootsSetting) -> RootsSetting:
        if isinstance(roots, tuple):
            for uri in roots:
                if ":" not in uri or any(ch <= " " for ch in uri):
                    raise ValueError(f"{uri!r} is not a URI (e.g. file:///srv/{{tenant}})")
        return roots


class ExtensionsSpec(StrictModel):
    """MCP extensions (SEP-2133) offered to clients beyond those the proxy enforces."""

    allow: tuple[str, ...] = Field(
        default=(),
        description="Extensions (e.g. io.modelcontextprotocol/ui) kept in the capabilities both sides "
        "declare (server/discover, initialize, a request's clientCapabilities) although the proxy does "
        "not enforce them; methods the proxy does not know stay refused. The extensions it enforces "
        "(io.modelcontextprotocol/tasks) need no entry; any other is removed.",
    )


class RecentActivitySpec(StrictModel):
    """`proxy_recent_activity`: a tool the proxy offers itself, answering from the caller's own
    tenant's audit records."""

    enabled: bool = Field(default=False, description="Offer the proxy_recent_activity tool.")
    max_records: int = Field(default=20, ge=1, le=200, description="Records it returns at most.")
    scope: Literal["own", "tenant"] = Field(
        default="own",
        description="own: the caller's own records (same issuer and subject); tenant: every user of the "
        "caller's tenant.",
    )


class PolicyFile(StrictModel):
    """A policy file (policies/NAME.yaml), shared by the tenants that name it."""

    tenant_arguments: TenantArgumentsSpec = Field(
        default_factory=TenantArgumentsSpec,
        description="Arguments that name a tenant: they must name the caller's own.",
    )
    tools: ToolsSpec = Field(default_factory=ToolsSpec, description=ToolsSpec.__doc__)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description=ResourcesSpec.__doc__)
    recent_activity: RecentActivitySpec = Field(
        default_factory=RecentActivitySpec, description=RecentActivitySpec.__doc__
    )
    client_capabilities: ClientCapabilitiesSpec = Field(
        default_factory=ClientCapabilitiesSpec, description=ClientCapabilitiesSpec.__doc__
    )
    extensions: ExtensionsSpec = Field(default_factory=ExtensionsSpec, description=ExtensionsSpec.__doc__)


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


@dataclass(frozen=True, slots=True)
class ClientCapabilities:
    """The compiled client_capabilities section."""

    roots: str  # "deny", "allow" or "list"
    root_uris: tuple[str, ...]  # for "list": with {tenant} still in them
    sampling: bool
    elicitation: bool

    def roots_for(self, tenant: str) -> list[JsonObject]:
        """The roots the proxy answers roots/list with for this tenant."""
        return [{"uri": uri.replace("{tenant}", tenant)} for uri in self.root_uris]

    def allows(self, method: str) -> bool:
        """Whether a server-to-client request of this method may reach the client."""
        if method == "roots/list":
            return self.roots == "allow"
        if method == "sampling/createMessage":
            return self.sampling
        if method == "elicitation/create":
            return self.elicitation
        return True

    def rule_for(self, method: str) -> str:
        return {"roots/list": "roots", "sampling/createMessage": "sampling"}.get(method, "elicitation")

    def filter(self, capabilities: Any) -> Any:
        """A client's capabilities as the upstream may see them."""
        if not isinstance(capabilities, dict):
            return capabilities
        kept = dict(capabilities)
        if self.roots == "deny":
            kept.pop("roots", None)
        elif self.roots == "list":
            kept["roots"] = {}  # the proxy answers roots/list itself; its list never changes
        if not self.sampling:
            kept.pop("sampling", None)
        if not self.elicitation:
            kept.pop("elicitation", None)
        return kept


def compile_client_capabilities(spec: ClientCapabilitiesSpec) -> ClientCapabilities:
    roots = spec.roots if isinstance(spec.roots, str) else "list"
    uris = spec.roots if isinstance(spec.roots, tuple) else ()
    return ClientCapabilities(roots, uris, spec.sampling == "allow", spec.elicitation == "allow")


DEFAULT_CLIENT_CAPABILITIES: Final = compile_client_capabilities(ClientCapabilitiesSpec())


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
    recent_activity_tenant_wide: bool = False  # scope: tenant
    json_document_tools: re.Pattern[str] = re.compile(r"(?!)")
    client_capabilities: ClientCapabilities = field(default_factory=lambda: DEFAULT_CLIENT_CAPABILITIES)
    extensions_allowed: frozenset[str] = frozenset()  # passed through though not enforced
    public_uris: PublicUris = NO_PUBLIC_URIS  # shared by every tenant, in tenant-scoped schemes

    def json_documents_in(self, tool: str) -> bool:
        """Whether the tool's string arguments carry JSON documents the proxy leaves alone."""
        return self.json_document_tools.match(tool) is not None

    @property
    def scoped_schemes(self) -> frozenset[str]:
        return frozenset(t.scheme for t in self.uri_templates)

    @functools.cached_property
    def scoped_uri_mentions(self) -> re.Pattern[str] | None:
        """URIs of a tenant-scoped scheme wherever they stand in a text (a log line naming one)."""
        if not self.uri_templates:
            return None
        schemes = "|".join(re.escape(scheme) for scheme in sorted(self.scoped_schemes))
        return re.compile(rf"(?i)(?<![A-Za-z0-9+.-])(?:{schemes}):[^\s\"'<>`]*")

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
        recent_activity_tenant_wide=spec.recent_activity.scope == "tenant",
        json_document_tools=_globs(spec.tenant_arguments.json_document_tools),
        client_capabilities=compile_client_capabilities(spec.client_capabilities),
        extensions_allowed=frozenset(spec.extensions.allow),
        public_uris=compile_public_uris(spec.resources.public_uris, spec.resources.tenant_uri_templates),
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
    for index, glob in enumerate(spec.resources.public_uris):
        try:
            compile_public_uri(glob, spec.resources.tenant_uri_templates)
        except ValueError as exc:
            raise ConfigError(path, f"resources.public_uris.{index}", str(exc)) from None
    return compile_policy(path.stem, spec)
