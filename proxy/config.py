"""YAML config -> frozen, validated objects. Parsed once at load; a bad file never reaches a request.

`${VAR}` (or `${VAR:-default}`) in any string reads the environment; `$$` is a literal `$`.
Relative paths are relative to the config file. Unknown keys are rejected. Every error names the
file, the key path and what is wrong, on one line.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

TENANT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
TenantId = Annotated[str, StringConstraints(pattern=TENANT_ID_PATTERN)]
HeaderName = Annotated[str, StringConstraints(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")]
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
Algorithm = Literal[
    "HS256", "HS384", "HS512",
    "RS256", "RS384", "RS512",
    "PS256", "PS384", "PS512",
    "ES256", "ES256K", "ES384", "ES512",
    "EdDSA",
]  # fmt: skip

# Client-supplied headers that must never be configured as upstream headers: the proxy owns them.
RESERVED_UPSTREAM_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "accept",
        "transfer-encoding",
        "connection",
        "mcp-session-id",
        "mcp-protocol-version",
        "mcp-method",
        "mcp-name",
        "last-event-id",
        "traceparent",  # with tracing on, the proxy's own trace context
        "tracestate",
    }
)


class ConfigError(Exception):
    """A config or policy file that cannot be used; the message is one line for the operator."""

    def __init__(self, file: Path | str, key_path: str, problem: str) -> None:
        self.file = str(file)
        self.key_path = key_path
        self.problem = problem
        where = f"{self.file}: {key_path}: " if key_path else f"{self.file}: "
        super().__init__(_one_line(f"{where}{problem}"))


_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")


def _one_line(text: str) -> str:
    """Control characters (a key with a newline in it, say) escaped: the error stays one line."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


def _resolve_path(value: Path | None, info: ValidationInfo) -> Path | None:
    if value is None:
        return None
    base = (info.context or {}).get("base_dir")
    if base is not None and not value.is_absolute():
        return (Path(base) / value).resolve()
    return value


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http(s) URL, got {value!r}")
    return value


class ListenConfig(StrictModel):
    """Where the proxy listens for MCP clients, and what it accepts from them."""

    host: str = Field(default="127.0.0.1", description="Address to listen on (needs a restart to change).")
    port: int = Field(
        default=8080, ge=0, le=65535, description="TCP port to listen on; 0 picks a free one (restart)."
    )
    path: Annotated[str, StringConstraints(pattern=r"^/[A-Za-z0-9._~/-]*$")] = Field(
        default="/mcp", description="HTTP path of the MCP endpoint (restart)."
    )
    public_url: str | None = Field(
        default=None,
        description="This resource's identifier as clients reach it: the audience every token must "
        "name (RFC 8707) and the base of the RFC 9728 metadata. Default: http://HOST:PORT/PATH (restart).",
    )
    allowed_origins: tuple[str, ...] = Field(
        default=(),
        description="Extra browser Origins allowed to call; any other Origin gets 403 (DNS rebinding). "
        "Always allowed: public_url's origin and, when listening on loopback, localhost on any port. "
        "Requests without an Origin header are allowed.",
    )
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="Larger request bodies get 413."
    )
    max_json_members: int = Field(
        default=20_000,
        ge=16,
        description="Members and elements a request body may hold in all (checked cheaply before it is "
        "parsed); more get -32700.",
    )
    max_json_depth: int = Field(
        default=64, ge=4, le=512, description="Deepest nesting a request body may have; deeper gets -32700."
    )
    max_header_bytes: int = Field(
        default=16 * 1024,
        ge=1024,
        le=1024 * 1024,
        description="Longest request line or header field accepted; longer ones get 431.",
    )
    drain_delay_seconds: float = Field(
        default=5.0,
        ge=0,
        description="On SIGTERM/SIGINT, /readyz answers 503 at once while everything is still served for "
        "this long (load balancers stop sending meanwhile); then the listener closes.",
    )
    shutdown_grace_seconds: float = Field(
        default=10.0,
        ge=0,
        description="Once the listener has closed, how long requests in flight get to finish; what is "
        "still open then is answered with a JSON-RPC error (-32014) and the process exits 0 within "
        "about 1 s. The whole stop takes at most drain_delay_seconds + this + 1 s.",
    )
    idle_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A connection with no complete request for this long is closed (slow or idle headers).",
    )
    body_timeout_seconds: float = Field(
        default=30.0, gt=0, description="A request body not fully received in this long gets 408."
    )

    _check_public_url = field_validator("public_url")(lambda v: None if v is None else _http_url(v))

    @property
    def resource_url(self) -> str:
        """This resource's identifier: the audience tokens must name."""
        return self.public_url or f"http://{self.host}:{self.port}{self.path}"


class IssuerConfig(StrictModel):
    """One token issuer: how its tokens are verified and where the tenant is in their claims."""

    issuer: Annotated[str, StringConstraints(min_length=1)] = Field(
        description="The `iss` claim this issuer's tokens carry, exactly."
    )
    audiences: tuple[str, ...] = Field(
        default=(),
        description="Audiences accepted in `aud` besides listen.public_url, which every issuer's "
        "tokens may always name.",
    )
    algorithms: tuple[Algorithm, ...] = Field(
        min_length=1,
        description="Signature algorithms accepted, pinned here and never taken from the token; "
        "HS* (with secret_env) and asymmetric ones (with public_key_file or jwks_url) do not mix.",
    )
    secret_env: str | None = Field(
        default=None,
        description="HS* only: the environment variable holding the shared secret (at least 32 "
        "random bytes; placeholders and guessable values are refused).",
    )
    public_key_file: Path | None = Field(
        default=None, description="PEM public key that verifies the tokens (relative to the config file)."
    )
    private_key_file: Path | None = Field(
        default=None,
        description="PEM private key used only by `mint-token` to sign development tokens; the proxy "
        "never signs with it.",
    )
    jwks_url: str | None = Field(
        default=None,
        description="The issuer's JWKS URL; keys are picked by the token's `kid`. Exactly one of "
        "secret_env, public_key_file and jwks_url is set.",
    )
    tenant_claim: Annotated[str, StringConstraints(pattern=r"^[^.]+(\.[^.]+)*$")] = Field(
        default="tenant",
        description="Dotted path into the claims (e.g. org.id) whose string value, byte for byte, "
        "names a configured tenant.",
    )
    subject_claim: str = Field(
        default="sub", description="The claim naming the user: sessions and audit records carry it."
    )
    required_scopes: tuple[str, ...] = Field(
        default=(),
        description="Scopes every token must carry (`scope` or `scp` claim); missing ones get 403 "
        "insufficient_scope.",
    )
    leeway_seconds: float = Field(
        default=30.0, ge=0, le=300, description="Clock skew allowed for exp, nbf and iat."
    )
    jwks_cache_seconds: float = Field(
        default=300.0, gt=0, description="How long a fetched key set is used before fetching it again."
    )
    jwks_refetch_cooldown_seconds: float = Field(
        default=30.0,
        ge=0,
        description="Least time between two fetches caused by unknown `kid`s (a key rotation).",
    )
    jwks_timeout_seconds: float = Field(default=5.0, gt=0, description="Timeout of one JWKS fetch.")

    _paths = field_validator("public_key_file", "private_key_file")(_resolve_path)
    _check_jwks = field_validator("jwks_url")(lambda v: None if v is None else _http_url(v))

    @model_validator(mode="after")
    def _one_key_source(self) -> IssuerConfig:
        sources = [s for s in ("secret_env", "public_key_file", "jwks_url") if getattr(self, s) is not None]
        if len(sources) != 1:
            raise ValueError("exactly one of secret_env, public_key_file, jwks_url must be set")
        hmac = [a for a in self.algorithms if a in HMAC_ALGORITHMS]
        if hmac and len(hmac) != len(self.algorithms):
            raise ValueError("algorithms must not mix HS* with asymmetric algorithms")
        if hmac and self.secret_env is None:
            raise ValueError("HS* algorithms need secret_env")
        if not hmac and self.secret_env is not None:
            raise ValueError("secret_env is only for HS* algorithms")
        return self

    @property
    def is_hmac(self) -> bool:
        return self.algorithms[0] in HMAC_ALGORITHMS


class AuthConfig(StrictModel):
    """Who may call: the token issuers the proxy trusts."""

    authorization_servers: tuple[str, ...] = Field(
        default=(),
        description="Authorization servers advertised to clients in the RFC 9728 protected resource "
        "metadata.",
    )
    issuers: tuple[IssuerConfig, ...] = Field(
        description="The trusted token issuers; a token is verified by the one its `iss` names."
    )
    cache_seconds: float = Field(
        default=60.0,
        ge=0,
        le=3600,
        description="How long a verified token is remembered (by a hash of it) instead of being verified "
        "again: never past its `exp` less the issuer's leeway; forgotten on reload and when a JWKS key "
        "set is fetched again; failures are never remembered. 0: every request is verified.",
    )

    @field_validator("issuers")
    @classmethod
    def _unique_issuers(cls, issuers: tuple[IssuerConfig, ...]) -> tuple[IssuerConfig, ...]:
        if not issuers:
            raise ValueError("at least one issuer is required")
        seen: set[str] = set()
        for issuer in issuers:
            if issuer.issuer in seen:
                raise ValueError(f"issuer {issuer.issuer!r} is configured twice")
            seen.add(issuer.issuer)
        return issuers


class ChildLimits(StrictModel):
    """What one stdio child may use (setrlimit in the child, before exec); 0 leaves a limit unset.
    The process is refused more memory or files beyond them, and killed past its CPU time."""

    memory_bytes: int = Field(
        default=2 * 1024**3,
        ge=0,
        description="address space of the child (RLIMIT_AS); 0: no limit",
    )
    cpu_seconds: int = Field(
        default=3600,
        ge=0,
        description="CPU time of the child (RLIMIT_CPU): past it the child is killed and restarted on "
        "next use; 0: no limit",
    )
    open_files: int = Field(
        default=1024,
        ge=0,
        description="open file descriptors of the child (RLIMIT_NOFILE); 0: the proxy's own limit",
    )


EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class UpstreamConfig(StrictModel):
    """A tenant's MCP server: over streamable HTTP (`url`) or a local program over stdio (`command`)."""

    url: str | None = Field(default=None, description="HTTP upstream: the MCP endpoint's URL.")
    headers: dict[HeaderName, str] = Field(
        default_factory=dict,
        description="HTTP upstream: headers sent on every request, e.g. the tenant's own credentials "
        '(`Authorization: "Bearer ${ACME_TOKEN}"`). The client\'s headers never go upstream.',
    )
    tenant_header: HeaderName | None = Field(
        default=None,
        description="HTTP upstream: a header set to the tenant id on every request (a client-sent copy "
        "is dropped first), e.g. for an upstream that scopes its data by it.",
    )
    connect_timeout_seconds: float = Field(
        default=5.0, gt=0, description="HTTP upstream: timeout for a free connection slot and connecting."
    )
    read_timeout_seconds: float = Field(
        default=300.0,
        gt=0,
        description="How long to wait for the upstream's answer, and between two parts of a stream.",
    )
    max_connections: int = Field(
        default=100, ge=1, description="HTTP upstream: connections in use at once, for this tenant."
    )
    # Below the upstream's own keep-alive (uvicorn's is 5 s), so a request never goes out on a
    # connection the server is closing.
    keepalive_seconds: float = Field(
        default=4.0,
        gt=0,
        description="HTTP upstream: idle connections are dropped after this long (keep it below the "
        "upstream's own keep-alive timeout).",
    )
    command: tuple[str, ...] | None = Field(
        default=None,
        min_length=1,
        description="stdio upstream: the program and its arguments. A bare program name is looked up "
        "on the proxy's PATH; a relative path (./server, bin/server) is relative to the config file.",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="stdio upstream: environment variables of the child, set here. The child never "
        "gets the proxy's environment: only these and those inherit_env names.",
    )
    inherit_env: tuple[EnvName, ...] = Field(
        default=(),
        description="stdio upstream: names of variables copied from the proxy's environment into the "
        "child's (e.g. PATH, HOME: what npx or uvx need); nothing by default. A name that is unset in "
        "the proxy is skipped; env wins over a copied value. Variables the config reads as secrets "
        "cannot be named.",
    )
    cwd: Path | None = Field(
        default=None,
        description="stdio upstream: the child's working directory (relative to the config file); "
        "default: the proxy's.",
    )
    isolation: Literal["per_tenant", "per_session"] | None = Field(
        default=None,
        description="stdio upstream: per_session (default) gives each handshake-era session its own "
        "process; per_tenant shares one process between a tenant's sessions.",
    )
    idle_stop_seconds: float = Field(
        default=300.0,
        gt=0,
        description="stdio: a process nobody has sent a request for this long is stopped (a shared one, "
        "or a per_session one whatever its session's idle timeout); the next use starts it again",
    )
    max_processes: int = Field(
        default=8,
        ge=1,
        description="stdio: at most this many processes of the tenant at once; an initialize (or a "
        "request needing a new process) beyond it gets 429 -32009 with Retry-After and starts nothing",
    )
    limits: ChildLimits = Field(
        default_factory=ChildLimits,
        description="stdio: resource limits set in each child before it runs the command (setrlimit)",
    )

    _check_url = field_validator("url")(lambda v: None if v is None else _http_url(v))
    _paths = field_validator("cwd")(_resolve_path)

    @field_validator("command")
    @classmethod
    def _program_relative_to_config(
        cls, command: tuple[str, ...] | None, info: ValidationInfo
    ) -> tuple[str, ...] | None:
        """A program given as a relative path (`./server`, `bin/server`) is relative to the config
        file; a bare name (`python`) is looked up on PATH. Arguments are passed as they are."""
        if not command or not command[0]:
            return command
        program = Path(command[0])
        if "/" in command[0] and not program.is_absolute():
            resolved = _resolve_path(program, info)
            assert resolved is not None
            return (str(resolved), *command[1:])
        return command

    @field_validator("headers")
    @classmethod
    def _no_reserved_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        for name in headers:
            if name.lower() in RESERVED_UPSTREAM_HEADERS:
                raise ValueError(f"header {name!r} is set by the proxy and cannot be configured")
        return headers

    @model_validator(mode="after")
    def _one_transport(self) -> UpstreamConfig:
        if (self.url is None) == (self.command is None):
            raise ValueError("exactly one of url (HTTP upstream) or command (stdio upstream) must be set")
        if self.url is None and (self.headers or self.tenant_header):
            raise ValueError("headers and tenant_header apply only to HTTP upstreams")
        if self.command is None and (self.env or self.inherit_env or self.cwd or self.isolation):
            raise ValueError("env, inherit_env, cwd and isolation apply only to stdio upstreams")
        defaults = type(self).model_fields
        stdio_only = [
            key
            for key in ("max_processes", "limits")
            if getattr(self, key) != defaults[key].get_default(call_default_factory=True)
        ]
        if self.command is None and stdio_only:
            raise ValueError(f"{', '.join(stdio_only)} apply only to stdio upstreams")
        return self

    def child_environment(self, proxy_env: Mapping[str, str]) -> dict[str, str]:
        """What a stdio child gets: the inherit_env names the proxy has, then env on top."""
        inherited = {name: proxy_env[name] for name in self.inherit_env if name in proxy_env}
        return {**inherited, **self.env}


class LimitsConfig(StrictModel):
    """Per-tenant limits; 0 turns a limit off. `limits` sets every tenant's, `tenants.<id>.limits`
    overrides single keys for one tenant."""

    requests_per_second: float = Field(
        default=0.0, ge=0, description="Sustained requests per second (token bucket); 0: no limit."
    )
    burst: int = Field(
        default=0, ge=0, description="Requests allowed at once above the rate; 0: one second's worth."
    )
    max_concurrent: int = Field(default=0, ge=0, description="Requests in flight at once; 0: no limit.")
    circuit_failures: int = Field(
        default=5,
        ge=0,
        description="Consecutive upstream failures that open the tenant's circuit (fail fast with 503); "
        "timeouts and HTTP 500 answers alone open it only when requests of at least two principals met them; "
        "0: never.",
    )
    circuit_open_seconds: float = Field(
        default=30.0, gt=0, description="How long an open circuit fails fast before one trial request."
    )
    max_bytes_in_flight: int = Field(
        default=16 * 1024 * 1024,
        ge=0,
        description="Request body bytes in flight at once (charged before a body is read); beyond it 429; "
        "0: no limit.",
    )
    bytes_per_second: float = Field(
        default=0.0, ge=0, description="Request body bytes a second (token bucket); 0: no limit."
    )
    max_streams: int = Field(
        default=100,
        ge=0,
        description="Long-lived streams open at once (GET streams, subscriptions/listen), per replica; "
        "beyond it 429; 0: no limit.",
    )
    work_share: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="Share of this replica's event loop a tenant's heavy requests may take while other "
        "tenants are being served. Each step of an exchange on the loop (synchronous work between two "
        "waits: checking and parsing a body, the policy walk, serialisation) beyond an ordinary step's "
        "2 ms is charged to a budget refilled at this many seconds a second (holding one second's "
        "worth); while a tenant is in debt, its users whose requests were charged in the last 10 s get "
        "429 with Retry-After before their body is read, but only while another tenant was admitted in the "
        "last 10 s: a tenant alone is never refused for it, and ordinary requests or streams are never "
        "charged. "
        "0: no budget.",
    )
    refusal_hold_seconds: float = Field(
        default=1.0,
        ge=0,
        le=30,
        description="A request refused by these limits before its body has arrived is answered after "
        "this long (at most its Retry-After) with the connection closed, costing no CPU meanwhile: a "
        "client that ignores Retry-After and sends large bodies again at once goes at the hold's pace. "
        "At most max_concurrent (16 when unlimited) of a tenant's refusals are held at once; more are "
        "answered at once. 0: answered at once.",
    )


class TenantLimitsConfig(StrictModel):
    """One tenant's overrides of `limits`: only the keys given here differ."""

    requests_per_second: float | None = Field(
        default=None, ge=0, description="Overrides limits.requests_per_second."
    )
    burst: int | None = Field(default=None, ge=0, description="Overrides limits.burst.")
    max_concurrent: int | None = Field(default=None, ge=0, description="Overrides limits.max_concurrent.")
    circuit_failures: int | None = Field(default=None, ge=0, description="Overrides limits.circuit_failures.")
    circuit_open_seconds: float | None = Field(
        default=None, gt=0, description="Overrides limits.circuit_open_seconds."
    )
    max_bytes_in_flight: int | None = Field(
        default=None, ge=0, description="Overrides limits.max_bytes_in_flight."
    )
    bytes_per_second: float | None = Field(
        default=None, ge=0, description="Overrides limits.bytes_per_second."
    )
    max_streams: int | None = Field(default=None, ge=0, description="Overrides limits.max_streams.")
    work_share: float | None = Field(default=None, ge=0, le=1, description="Overrides limits.work_share.")
    refusal_hold_seconds: float | None = Field(
        default=None, ge=0, le=30, description="Overrides limits.refusal_hold_seconds."
    )


PolicyName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]+$")]
ClaimValue = str | int | bool


class TenantConfig(StrictModel):
    """One tenant: its own upstream, its policy and its limits."""

    upstream: UpstreamConfig = Field(description="The tenant's own MCP server.")
    policy: PolicyName | None = Field(
        default=None,
        description="Name of the tenant's policy: policies_dir/NAME.yaml. Unset: no tenant arguments, "
        "every tool allowed, nothing cached by tool (client roots are still withheld).",
    )
    limits: TenantLimitsConfig = Field(
        default_factory=TenantLimitsConfig, description="Overrides of the default limits for this tenant."
    )


class TenantTemplateConfig(StrictModel):
    """Tenants no `tenants` entry names, served alike: the first template whose `match` and
    `claims` fit the caller's tenant and token serves it."""

    match: str = Field(
        description="A regular expression the whole tenant id must match (anchored at both ends); "
        "ids are always ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ as well"
    )
    claims: dict[str, ClaimValue | tuple[ClaimValue, ...]] = Field(
        default_factory=dict,
        description="Conditions on the verified token's claims (dotted paths): the claim must equal "
        "the value, or one of the values of a list",
    )
    upstream: UpstreamConfig = Field(
        description="As a tenant's upstream; {tenant} in url, headers, command, env and cwd is "
        "replaced by the tenant id"
    )
    policy: PolicyName | None = Field(default=None, description="As a tenant's: policies_dir/NAME.yaml")
    limits: TenantLimitsConfig = Field(
        default_factory=TenantLimitsConfig, description="As a tenant's limits: overrides of `limits`"
    )
    idle_seconds: float = Field(
        default=300.0,
        gt=0,
        description="A tenant served by this template, unused this long (no request in flight, no "
        "session in this replica), is dropped from memory: its upstream connections or processes "
        "closed, its catalog, limits and metrics forgotten; its next request builds it again",
    )

    @field_validator("match")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return pattern


class TenantAllowlistConfig(StrictModel):
    """The tenant ids templates may serve, when the id space must be closed (explicit `tenants`
    entries are always served). A string is the `file` form."""

    file: Path | None = Field(
        default=None,
        description="One tenant id a line ('#' starts a comment); read at start and on every reload, "
        "and a change of it triggers a reload",
    )
    redis_set: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = Field(
        default=None,
        description="The name of a Redis set of tenant ids (state.backend: redis), asked on a tenant's "
        "first request and again every cache_seconds while it is active",
    )
    cache_seconds: float = Field(
        default=30.0, gt=0, description="How long a tenant found in redis_set is served without asking again"
    )

    _paths = field_validator("file")(_resolve_path)

    @model_validator(mode="before")
    @classmethod
    def _file_shorthand(cls, data: Any) -> Any:
        return {"file": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _one_source(self) -> TenantAllowlistConfig:
        if (self.file is None) == (self.redis_set is None):
            raise ValueError("exactly one of file or redis_set must be set")
        return self


class CacheConfig(StrictModel):
    """The response cache: keyed by tenant, principal, upstream and request, bounded by bytes."""

    enabled: bool = Field(default=True, description="false: nothing is cached.")
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=0, description="Bytes the cache holds at most.")
    max_entry_bytes: int = Field(default=1024 * 1024, ge=0, description="Larger results are never cached.")
    max_bytes_per_tenant: int | None = Field(
        default=None,
        ge=0,
        description="each tenant's own budget: a tenant's store evicts only its own entries. Default: "
        "max_bytes divided among the configured tenants, at least one entry's worth",
    )


class SessionsConfig(StrictModel):
    """Handshake-era sessions (Mcp-Session-Id), issued by the proxy and bound to tenant and subject."""

    idle_timeout_seconds: float = Field(
        default=900.0, gt=0, description="A session unused this long ends (upstream too)."
    )
    max_per_tenant: int = Field(
        default=1000, ge=1, description="Open sessions per tenant; a new one over it gets 429."
    )
    answer_timeout_seconds: float = Field(
        default=300.0,
        gt=0,
        description="How long an upstream waits for a client's answer to its request (sampling, "
        "elicitation, roots) before the proxy answers it with an error (-32001).",
    )


class BridgingConfig(StrictModel):
    """Era bridging: 2026-07-28 clients served by handshake-only upstreams (on upstream sessions the
    proxy holds per tenant and caller), and handshake clients by modern-only upstreams."""

    enabled: bool = Field(
        default=True,
        description="false: a 2026-07-28 request for a handshake-only upstream gets -32022 (HTTP 400, "
        "data.supported) so the client falls back to initialize, and a handshake client's initialize "
        "is forwarded as it is whatever the upstream speaks.",
    )
    idle_seconds: float = Field(
        default=300.0,
        gt=0,
        description="An upstream session held for 2026-07-28 callers that nothing used this long is ended.",
    )
    max_sessions_per_tenant: int = Field(
        default=100,
        ge=1,
        description="Upstream sessions held for a tenant's 2026-07-28 callers at once (one per caller and "
        "set of client capabilities); one more gets 429 while none is idle that may make room (an idle "
        "session of the caller's own, or of a caller holding more than it does).",
    )
    max_sessions_per_caller: int = Field(
        default=4,
        ge=1,
        description="Upstream sessions held for one caller (principal) of a tenant at once, and always "
        "fewer than max_sessions_per_tenant unless that is 1: one more ends the caller's own least "
        "recently used idle one, else gets 429, so no caller can take the tenant's sessions from the "
        "others. A caller needs more than one only when it declares different client capabilities.",
    )


class AuditConfig(StrictModel):
    """The audit trail: one JSON line per request in DIR/<tenant>.jsonl, summaries only."""

    dir: Path | None = Field(
        default=Path("audit"),
        validate_default=True,
        description="Directory of the per-tenant files (relative to the config file); null: no files.",
    )
    max_file_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="A file is rotated when it reaches this size."
    )
    backups: int = Field(default=5, ge=0, description="Rotated files kept per tenant.")

    _paths = field_validator("dir")(_resolve_path)


class ReadinessConfig(StrictModel):
    """When /readyz says ready: `any` reachable upstream (default), `all` of them, or `ignore` them."""

    upstreams: Literal["any", "all", "ignore"] = Field(
        default="any",
        description="Ready when any tenant's upstream is reachable, all of them, or regardless (ignore). "
        "A stdio upstream counts when its program starts and answers the MCP handshake (any, all: the "
        "check starts a child of its own until one has; ignore starts none).",
    )
    check_interval_seconds: float = Field(
        default=10.0, gt=0, description="How often upstreams are checked, in the background."
    )


class StateConfig(StrictModel):
    """Where state shared between replicas lives: in this process (default) or in Redis."""

    backend: Literal["memory", "redis"] = Field(
        default="memory",
        description="memory: sessions, cache, limits and audit streams in this process; redis: shared by "
        "every replica that names the same Redis and key_prefix.",
    )
    url: str | None = Field(
        default=None,
        description="redis://[:PASSWORD@]HOST:PORT/DB (rediss:// for TLS, unix:// for a socket); take "
        "the password from the environment with ${VAR}. redis+cluster:// (or rediss+cluster://) names "
        "one node of a Redis Cluster.",
    )
    cluster: bool = Field(
        default=False,
        description="state.url names a node of a Redis Cluster (as a redis+cluster:// URL does): the "
        "other nodes are found from it, and each tenant's keys live in one hash slot.",
    )
    key_prefix: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,64}$")] = Field(
        default="mcp-tenant-proxy",
        description="First part of every key; one per deployment when deployments share a Redis.",
    )
    timeout_seconds: float = Field(
        default=0.5, gt=0, description="Per Redis call: a slow or absent Redis fails fast."
    )
    audit_max_records: int = Field(
        default=10_000, ge=1, description="Audit summaries kept per tenant in its Redis stream."
    )

    @model_validator(mode="after")
    def _url_for_redis(self) -> StateConfig:
        if self.backend == "redis" and not self.url:
            raise ValueError("state.url is required when state.backend is redis")
        schemes = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
        if self.url is not None and not self.url.startswith(schemes):
            raise ValueError("state.url must be a redis://, rediss://, unix:// or redis+cluster:// URL")
        if self.is_cluster and self.url is not None:
            if self.url.startswith("unix://"):
                raise ValueError("a Redis Cluster is reached over TCP: redis+cluster://host:port")
            if urlsplit(self.url).path not in ("", "/", "/0"):
                raise ValueError("a Redis Cluster has only database 0: leave the path out of state.url")
        return self

    @property
    def is_cluster(self) -> bool:
        return self.cluster or (self.url or "").startswith(("redis+cluster://", "rediss+cluster://"))


class MetricsListenConfig(StrictModel):
    host: str = Field(default="127.0.0.1", description="address of the metrics listener")
    port: int = Field(default=9464, ge=0, le=65535, description="port of the metrics listener (0: any free)")


class MetricsConfig(StrictModel):
    """/metrics names every tenant: it is served on a listener of its own (by default on loopback),
    never where tenants' clients connect unless `public` says so. With `bearer_token_env`, it answers
    only `Authorization: Bearer <that variable's value>`, on either listener."""

    listen: MetricsListenConfig | None = Field(
        default_factory=MetricsListenConfig,
        description="the metrics listener (GET /metrics, and the admin endpoints); null: none",
    )
    public: bool = Field(
        default=False,
        description="also answer GET /metrics on the public listener (otherwise 404 there)",
    )
    bearer_token_env: str | None = Field(
        default=None,
        description="Environment variable holding the token /metrics and the admin endpoints (/admin/..., "
        "on the metrics listener only) require (at least 16 characters); unset: /metrics needs no token "
        "and the admin endpoints are off (404).",
    )


class TracingConfig(StrictModel):
    """OpenTelemetry traces, exported over OTLP/HTTP (needs the tracing extra: pip install
    'mcp-tenant-proxy[tracing]'): a server span per request with events for authentication, policy
    and cache, and a client span for the upstream call, whose trace context goes upstream (a
    `traceparent` header, and `params._meta.traceparent` in requests). Changing it needs a restart."""

    enabled: bool = Field(
        default=False,
        description="Export traces. Off: requests carry no tracing step and OpenTelemetry is not imported.",
    )
    endpoint: str = Field(
        default="http://127.0.0.1:4318/v1/traces",
        description="The collector's OTLP/HTTP traces URL (protobuf). Headers it needs, e.g. credentials: "
        "the standard OTEL_EXPORTER_OTLP_TRACES_HEADERS variable.",
    )
    service_name: Annotated[str, StringConstraints(min_length=1)] = Field(
        default="mcp-tenant-proxy", description="The spans' service.name."
    )
    sample_ratio: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="Share of new traces recorded; a trusted client's own sampling decision is followed.",
    )
    trust_client_context: bool = Field(
        default=False,
        description="Continue an authenticated client's trace (its params._meta.traceparent, else its "
        "traceparent header). Off: every request starts a new trace, so no tenant can place its "
        "requests into another's trace.",
    )

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, endpoint: str) -> str:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL")
        return endpoint

    @model_validator(mode="after")
    def _extra_installed(self) -> TracingConfig:
        if self.enabled and not tracing_installed():
            raise ValueError(
                "tracing.enabled needs the tracing extra: pip install 'mcp-tenant-proxy[tracing]'"
            )
        return self


def tracing_installed() -> bool:
    """Whether OpenTelemetry's SDK and OTLP/HTTP exporter can be imported (without importing them)."""
    try:
        return all(
            importlib.util.find_spec(name) is not None
            for name in ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http")
        )
    except ModuleNotFoundError:  # a parent package is missing
        return False


class ReloadConfig(StrictModel):
    """SIGHUP reloads, and with `watch_files` so does a change of the config file, a policy file or a
    key file it names; one edit is one reload, whichever notices it first."""

    watch_files: bool = Field(
        default=True,
        description="Reload when the config file, a policy file or a public key file it names changes.",
    )
    poll_seconds: float = Field(default=2.0, gt=0, description="How often the files are checked.")


class ProxyConfig(StrictModel):
    """mcp-tenant-proxy's config file."""

    listen: ListenConfig = Field(default_factory=ListenConfig, description=ListenConfig.__doc__)
    auth: AuthConfig = Field(description=AuthConfig.__doc__)
    # (Before `tenants`, whose check needs to know whether there are templates.)
    tenant_templates: tuple[TenantTemplateConfig, ...] = Field(
        default=(),
        description="Tenants without a `tenants` entry, served by the first template that matches "
        "(built on first use, dropped when idle); explicit entries win, no match is 403.",
    )
    tenants: dict[TenantId, TenantConfig] = Field(
        default_factory=dict,
        description="The tenants by id (`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`); a token's tenant claim "
        "must equal one exactly, with no case or Unicode folding.",
    )
    tenant_allowlist: TenantAllowlistConfig | None = Field(
        default=None, description="When set, templates serve only the tenant ids it lists."
    )
    policies_dir: Path = Field(
        default=Path("policies"),
        validate_default=True,
        description="Directory of the policy files, NAME.yaml (relative to the config file).",
    )
    cache: CacheConfig = Field(default_factory=CacheConfig, description=CacheConfig.__doc__)
    sessions: SessionsConfig = Field(default_factory=SessionsConfig, description=SessionsConfig.__doc__)
    bridging: BridgingConfig = Field(default_factory=BridgingConfig, description=BridgingConfig.__doc__)
    audit: AuditConfig = Field(default_factory=AuditConfig, description=AuditConfig.__doc__)
    limits: LimitsConfig = Field(
        default_factory=LimitsConfig,
        description="Every tenant's limits (0 turns one off); tenants.<id>.limits overrides single keys.",
    )
    readiness: ReadinessConfig = Field(default_factory=ReadinessConfig, description=ReadinessConfig.__doc__)
    reload: ReloadConfig = Field(default_factory=ReloadConfig, description=ReloadConfig.__doc__)
    state: StateConfig = Field(default_factory=StateConfig, description=StateConfig.__doc__)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Who may read /metrics.")
    tracing: TracingConfig = Field(default_factory=TracingConfig, description=TracingConfig.__doc__)
    _source: Path | None = PrivateAttr(default=None)

    _paths = field_validator("policies_dir")(_resolve_path)

    @model_validator(mode="before")
    @classmethod
    def _validate_default_sections(cls, data: Any) -> Any:
        """Absent sections are validated too, so their default paths resolve against the file."""
        if isinstance(data, dict) and "audit" not in data:
            data = {**data, "audit": {}}
        return data

    @field_validator("tenants")
    @classmethod
    def _some_tenants(cls, tenants: dict[str, TenantConfig], info: ValidationInfo) -> dict[str, TenantConfig]:
        if not tenants and not info.data.get("tenant_templates"):
            raise ValueError("at least one tenant (or a tenant template in tenant_templates) is required")
        return tenants

    @model_validator(mode="after")
    def _no_secret_inherited(self) -> ProxyConfig:
        """A child must never be handed the variables that hold the proxy's own secrets."""
        secrets = {i.secret_env for i in self.auth.issuers if i.secret_env is not None}
        if self.metrics.bearer_token_env is not None:
            secrets.add(self.metrics.bearer_token_env)
        upstreams = [(f"tenants.{tenant_id}", t.upstream) for tenant_id, t in self.tenants.items()]
        upstreams += [(f"tenant_templates.{i}", t.upstream) for i, t in enumerate(self.tenant_templates)]
        for where, upstream in upstreams:
            for index, name in enumerate(upstream.inherit_env):
                if name in secrets:
                    raise ValueError(
                        f"{where}.upstream.inherit_env.{index}: {name} holds a secret of the proxy and is "
                        "never passed to a child"
                    )
        return self

    @model_validator(mode="after")
    def _allowlist_store(self) -> ProxyConfig:
        allowlist = self.tenant_allowlist
        if allowlist is not None and allowlist.redis_set is not None and self.state.backend != "redis":
            raise ValueError("tenant_allowlist.redis_set needs state.backend: redis")
        return self

    @property
    def source(self) -> str:
        """The file this config was loaded from, for error messages."""
        return str(self._source) if self._source is not None else "<config>"

    def policy_file(self, name: str) -> Path:
        return self.policies_dir / f"{name}.yaml"

    def limits_of(self, tenant: TenantConfig) -> LimitsConfig:
        """A tenant's limits: the defaults with the tenant's (or its template's) own keys on top."""
        override = tenant.limits.model_dump(exclude_none=True)
        return self.limits.model_copy(update=override) if override else self.limits

    @property
    def policy_names(self) -> list[str]:
        """Every policy a tenant or a tenant template names."""
        named: list[TenantConfig | TenantTemplateConfig] = [*self.tenants.values(), *self.tenant_templates]
        return sorted({t.policy for t in named if t.policy is not None})

    @property
    def watched_files(self) -> list[Path]:
        """The files a reload reads, whose change triggers one: the config, every policy it names,
        the issuers' key files and the tenant allowlist file."""
        files = {self.policy_file(name) for name in self.policy_names}
        files.update(i.public_key_file for i in self.auth.issuers if i.public_key_file is not None)
        if self.tenant_allowlist is not None and self.tenant_allowlist.file is not None:
            files.add(self.tenant_allowlist.file)
        return ([self._source] if self._source is not None else []) + sorted(files)

    def tenant_config(self, tenant: str) -> TenantConfig | None:
        """What serves `tenant` as far as the config alone says (tools that have no token): its
        `tenants` entry, else the first template whose `match` fits (claim conditions not checked)."""
        if tenant in self.tenants:
            return self.tenants[tenant]
        from proxy.tenants.templates import TenantTemplates

        return TenantTemplates(self.tenant_templates).config_for_id(tenant)


# --- loading -----------------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(value: Any, env: Mapping[str, str], path: str = "") -> Any:
    """Replace `${VAR}` in every string of a parsed YAML tree; a missing variable is an error."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            if default is not None:  # as in a shell: the default also stands in for an empty value
                return env.get(name) or default
            if name in env:
                return env[name]
            raise ConfigError("", path, f"environment variable {name} is not set")

        return _VAR.sub(substitute, value)
    if isinstance(value, dict):
        return {key: interpolate(item, env, _join(path, key)) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env, _join(path, index)) for index, item in enumerate(value)]
    return value


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate mapping keys instead of silently keeping the last one."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor` merges; keys written here may override merged ones
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "mapping keys must be plain scalars", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_unique_mapping,
)


def read_yaml(path: Path) -> Any:
    """Parse one YAML file; any problem becomes a ConfigError naming the file (and line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", "file is not valid UTF-8") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(path, "", f"invalid YAML{where}: {problem}") from None


def format_validation_error(file: Path, error: ValidationError) -> ConfigError:
    """Turn pydantic's errors into one ConfigError line: the first key path, every problem."""
    problems = []
    first_path = ""
    for item in error.errors(include_url=False):
        key_path = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "string_type" and item["loc"][-1:] == ("[key]",):
            message = "must be a string: quote it in the YAML"
        if not first_path:
            first_path = key_path
        problems.append(f"{key_path}: {message}" if key_path != first_path else message)
    return ConfigError(file, first_path, "; ".join(problems))


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> ProxyConfig:
    """Read, interpolate and validate a config file, and check that every named policy exists."""
    file = Path(path).resolve()
    raw = read_yaml(file)
    if not isinstance(raw, dict):
        raise ConfigError(file, "", "the config must be a YAML mapping")
    try:
        data = interpolate(raw, os.environ if env is None else env)
    except ConfigError as exc:
        raise ConfigError(file, exc.key_path, exc.problem) from None
    try:
        config = ProxyConfig.model_validate(data, context={"base_dir": file.parent})
    except ValidationError as exc:
        raise format_validation_error(file, exc) from None
    config._source = file
    named: list[tuple[str, TenantConfig | TenantTemplateConfig]] = [
        *((f"tenants.{tenant_id}", tenant) for tenant_id, tenant in config.tenants.items()),
        *((f"tenant_templates.{index}", template) for index, template in enumerate(config.tenant_templates)),
    ]
    for where, tenant in named:
        if tenant.policy is not None and not config.policy_file(tenant.policy).is_file():
            raise ConfigError(
                file, f"{where}.policy", f"policy file {config.policy_file(tenant.policy)} does not exist"
            )
    return config
