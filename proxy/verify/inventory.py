"""What one tenant's deployment offers, as a client of that tenant sees it, and the policy behind it.

Taken through the proxy, so with the policy applied: denied tools are gone and, with
`hide_from_schema`, so are the tenant arguments the policy covers. That is why the static checks
read the policy too (`TenantView.covered`): an argument missing from a schema may be hidden, not absent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from proxy.config import ProxyConfig, TenantConfig, read_yaml
from proxy.layers.data_access.policy import Policy, PolicyFile, load_policy
from proxy.types import Era, JsonObject
from proxy.verify.client import McpClient


@dataclass
class Inventory:
    era: Era
    tools: list[JsonObject] = field(default_factory=list)
    prompts: list[JsonObject] = field(default_factory=list)
    templates: list[JsonObject] = field(default_factory=list)
    resources: list[JsonObject] = field(default_factory=list)

    def summary(self) -> str:
        counts = [
            count(len(self.tools), "tool"),
            count(len(self.prompts), "prompt"),
            count(len(self.templates), "resource template"),
            count(len(self.resources), "resource"),
        ]
        return f"{', '.join(counts)} ({self.era.value} era)"

    def tool(self, name: str) -> JsonObject | None:
        return next((tool for tool in self.tools if tool.get("name") == name), None)


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


async def take_inventory(client: McpClient) -> Inventory:
    """Every tool, prompt, resource template and resource the client is offered (all pages)."""
    assert client.era is not None, "connect first"
    return Inventory(
        client.era,
        tools=await client.list_all("tools/list", "tools"),
        prompts=await client.list_all("prompts/list", "prompts"),
        templates=await client.list_all("resources/templates/list", "resourceTemplates"),
        resources=await client.list_all("resources/list", "resources"),
    )


def _server_of(config: TenantConfig) -> tuple[object, ...]:
    """What makes two tenants' upstreams one server: the URL (whatever the credentials), or for
    stdio the program with the environment and directory its state is likely to live in."""
    upstream = config.upstream
    if upstream.url is not None:
        return (upstream.url,)
    return (upstream.command, sorted(upstream.env.items()), upstream.cwd)


@dataclass
class TenantView:
    """One tenant: its config, its policy (None: the proxy enforces no data-access rules for it)
    and, once taken, its inventory."""

    tenant: str
    config: TenantConfig
    policy: Policy | None
    policy_file: Path | None
    spec: PolicyFile = field(default_factory=PolicyFile)  # the policy as written (its patterns)
    inventory: Inventory = field(default_factory=lambda: Inventory(Era.MODERN))
    shares_upstream_with: tuple[str, ...] = ()  # other tenants whose upstream is this one's

    @classmethod
    def of(cls, config: ProxyConfig, tenant: str) -> TenantView:
        tenant_config = config.tenant_config(tenant)
        assert tenant_config is not None  # checked by the command
        server = _server_of(tenant_config)
        shared = tuple(t for t, c in config.tenants.items() if t != tenant and _server_of(c) == server)
        if tenant_config.policy is None:
            return cls(tenant, tenant_config, None, None, shares_upstream_with=shared)
        path = config.policy_file(tenant_config.policy)
        policy = load_policy(path)  # a bad file is a ConfigError naming it
        spec = PolicyFile.model_validate(read_yaml(path) or {})
        return cls(tenant, tenant_config, policy, path, spec, shares_upstream_with=shared)

    @property
    def covered(self) -> frozenset[str]:
        """The argument names the proxy checks (and fills in) for this tenant."""
        return self.policy.tenant_argument_names if self.policy is not None else frozenset()

    @property
    def fix_file(self) -> str:
        if self.policy_file is not None:
            return str(self.policy_file)
        return f"a new policy file, named by tenants.{self.tenant}.policy (none is set)"

    @property
    def where(self) -> str:
        """The upstream, as the config names it (a URL or a command line)."""
        return self.config.upstream.url or " ".join(self.config.upstream.command or ())

    @property
    def stdio(self) -> bool:
        return self.config.upstream.command is not None
