"""`verify`: reach the deployment as each named tenant, run the static checks, and the probes when
asked; the Report says what was found. Could-not-run reasons are VerifyErrors (exit 2).

Tokens come from the command line, or are minted with an issuer of the config that can sign
(a shared secret from the environment, or a private key file), for a subject of verify's own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from proxy.config import ProxyConfig
from proxy.layers.auth.authenticator import mint_token
from proxy.types import Era
from proxy.verify import probe, replay
from proxy.verify.client import McpClient, VerifyError, proxy_transport
from proxy.verify.inventory import TenantView, take_inventory
from proxy.verify.report import Report
from proxy.verify.static import static_findings

VERIFY_SUBJECT = "mcp-tenant-proxy-verify"
TOKEN_SECONDS = 900


def tokens_for(
    config: ProxyConfig,
    tenants: tuple[str, ...],
    given: Mapping[str, str],
    env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A token per tenant: the one given, or one minted with the first issuer that can sign."""
    tokens = {tenant: given[tenant] for tenant in tenants if tenant in given}
    missing = [tenant for tenant in tenants if tenant not in tokens]
    if not missing:
        return tokens
    problems = []
    for issuer in config.auth.issuers:
        if issuer.secret_env is None and issuer.private_key_file is None:
            continue
        scope = " ".join(issuer.required_scopes) or None
        try:
            for tenant in missing:
                tokens[tenant] = mint_token(
                    config, issuer.issuer, tenant, VERIFY_SUBJECT, TOKEN_SECONDS, scope, env
                )
        except (ValueError, OSError) as exc:
            problems.append(f"issuer {issuer.issuer}: {exc}")
            continue
        return tokens
    why = "; ".join(problems) or "no issuer has secret_env or private_key_file"
    raise VerifyError(f"no token for tenant {missing[0]}: give --token {missing[0]}=TOKEN ({why})")


class Deployment:
    """The proxy at `url`, reached as the tenants whose tokens it holds; `close()` ends every
    client it opened (their handshake sessions too)."""

    def __init__(self, url: str, tokens: Mapping[str, str], request_timeout: float) -> None:
        self.url = url
        self.tokens = dict(tokens)
        self.request_timeout = request_timeout
        self._clients: list[McpClient] = []

    async def open(self, tenant: str, era: Era | None = None) -> McpClient:
        transport = proxy_transport(self.url, self.tokens[tenant], self.request_timeout)
        client = McpClient(transport, f"tenant {tenant} at {self.url}", self.request_timeout)
        self._clients.append(client)
        await client.connect(era)
        return client

    async def close(self) -> None:
        for client in self._clients:
            with contextlib.suppress(VerifyError):
                await client.close()
        self._clients.clear()


async def verify(
    config: ProxyConfig,
    tenants: tuple[str, ...],
    url: str,
    tokens: Mapping[str, str],
    *,
    probes: bool = False,
    request_timeout: float = 30.0,
    accepted: frozenset[str] = frozenset(),
) -> Report:
    for tenant in tenants:
        if config.tenant_config(tenant) is None:
            raise VerifyError(f"tenant {tenant!r} is not configured in {config.source}")
    if probes and len(tenants) < 2:
        raise VerifyError("--probe needs two tenants (--tenants A,B): one writes, the other looks")
    report = Report(url, tenants, probes, accepted=accepted)
    views = {tenant: TenantView.of(config, tenant) for tenant in tenants}
    reached = Deployment(url, tokens, request_timeout)
    try:
        clients = {}
        for tenant, view in views.items():
            clients[tenant] = await reached.open(tenant)
            view.inventory = await take_inventory(clients[tenant])
            policy = view.policy_file or f"none (tenants.{tenant}.policy is not set)"
            report.checked.append(f"{tenant}: {view.inventory.summary()}; policy {policy}")
        for tenant, view in views.items():
            others = tuple(t for t in dict.fromkeys([*config.tenants, *tenants]) if t != tenant)
            for finding in static_findings(view, others):
                report.add(finding)
        if probes:
            parties = [probe.Party(views[tenant], clients[tenant]) for tenant in tenants]
            await run_probes(parties, reached, report)
    finally:
        await reached.close()
    return report


async def run_probes(parties: list[probe.Party], reached: Deployment, report: Report) -> None:
    for party in parties:
        await probe.seed(party, report)
        await replay.create_tasks(party, report)
    for party in parties:
        await probe.read_back(party, report)
        readers = [*party.readers, *party.resource_readers]
        shown = ", ".join(readers) if readers else "none (cross reads are caught only where data is kept)"
        report.notes.append(f"{party.tenant}: wrote canary {party.canary}; read back through: {shown}")
    for victim in parties:
        for attacker in parties:
            if attacker is victim:
                continue
            await probe.cross_read(victim, attacker, report)
            await probe.cross_resources(victim, attacker, report)
            await probe.recent_activity(victim, attacker, report)
            await replay.replay_request_state(victim, attacker, report)
            await replay.replay_tasks(victim, attacker, report)
            await replay.replay_session(reached.open, victim, attacker, report)
    if not any(party.task_ids for party in parties):
        report.notes.append("task replay not probed: no tool answered with a task")
    if not any(party.input_states for party in parties):
        report.notes.append("request-state replay not probed: no tool asked for input")
