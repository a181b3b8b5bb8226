"""The dynamic probes (`verify --probe`): canaries written as one tenant, looked for as another.

    seed        each tenant calls each tool it is offered (none that looks destructive) with its
                own tenant id in tenant-like arguments and its canary in every other string, and
                reads a marker URI only it ever uses (the proxy audits the URI)
    read back   each tenant calls each tool again, and reads its resources: what shows its own
                canary is a reader (the deployment keeps what was written, and shows it)
    cross read  tenant B calls each tool with tenant A's id in tenant-like arguments
    same call   B sends exactly the request with which A read its canary (cache, shared state)
    resources   B reads the URIs through which A read its canary
    activity    B's recent activity (the proxy's tool, and every upstream tool) is searched for
                A's canary and marker
Any answer to B that holds A's canary or marker is a leak, shown with the request that got it.
Session, request-state and task replays are in replay.py.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from proxy.layers.containment.recent_activity import RECENT_ACTIVITY_TOOL
from proxy.types import JsonObject
from proxy.verify.arguments import Filler, declared_arguments, sample_arguments
from proxy.verify.client import McpClient, Reply, VerifyError
from proxy.verify.inventory import TenantView
from proxy.verify.report import Finding, Report, Severity
from proxy.verify.snippets import deny_fix, instantiate, names_fix, tenant_variable
from proxy.verify.words import destructive

MAX_RESOURCE_READS = 20


@dataclass(frozen=True)
class InputState:
    """A request a tool answered with input_required: what a retry must send back."""

    tool: str
    arguments: JsonObject
    request_state: str
    input_requests: JsonObject


@dataclass
class Party:
    """One tenant during the probes."""

    view: TenantView
    client: McpClient
    canary: str = field(default_factory=lambda: f"verify-canary-{secrets.token_hex(8)}")
    marker: str = field(default_factory=lambda: f"verify-marker-{secrets.token_hex(8)}")
    readers: dict[str, JsonObject] = field(default_factory=dict)  # tool -> arguments that read the canary
    resource_readers: list[str] = field(default_factory=list)  # URIs whose content had the canary
    input_states: list[InputState] = field(default_factory=list)
    task_ids: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def tenant(self) -> str:
        return self.view.tenant

    @property
    def marker_uri(self) -> str:
        return f"{self.marker}://probe"

    def probed_tools(self) -> list[JsonObject]:
        tools = []
        for tool in self.view.inventory.tools:
            name = tool.get("name")
            if not isinstance(name, str) or name == RECENT_ACTIVITY_TOOL:
                continue
            if destructive(name, tool.get("annotations")):
                if name not in self.skipped:
                    self.skipped.append(name)
                continue
            tools.append(tool)
        return tools

    def arguments(self, tool: JsonObject, tenant: str, text: str, optional: bool) -> JsonObject:
        return sample_arguments(
            tool.get("inputSchema") or {}, Filler(tenant, text, self.view.covered, optional)
        )

    async def call(self, name: str, arguments: JsonObject, report: Report) -> Reply | None:
        try:
            reply = await self.client.request("tools/call", {"name": name, "arguments": arguments})
        except VerifyError as exc:
            report.notes.append(f"{self.tenant}: tools/call {name}: {exc}")
            return None
        self._remember_input_state(name, arguments, reply)
        return reply

    def _remember_input_state(self, name: str, arguments: JsonObject, reply: Reply) -> None:
        result = reply.result
        if result is not None and result.get("resultType") == "input_required":
            state, requests = result.get("requestState"), result.get("inputRequests")
            if isinstance(state, str) and isinstance(requests, dict):
                self.input_states.append(InputState(name, arguments, state, requests))


async def seed(party: Party, report: Report) -> None:
    """Write the party's canary wherever its tools take one."""
    for tool in party.probed_tools():
        await party.call(tool["name"], party.arguments(tool, party.tenant, party.canary, True), report)
    await _read(party, party.marker_uri, report)  # an unknown resource: an error, but its URI is audited
    if party.skipped:
        report.notes.append(f"{party.tenant}: not probed (their names say they may destroy or send): "
                            f"{', '.join(party.skipped)}")  # fmt: skip


async def read_back(party: Party, report: Report) -> None:
    """Find the tools and resources through which the party sees its own canary."""
    for tool in party.probed_tools():
        arguments = party.arguments(tool, party.tenant, "", False)
        reply = await party.call(tool["name"], arguments, report)
        if reply is not None and party.canary in reply.text:
            party.readers[tool["name"]] = arguments
    for uri in _resource_uris(party, party.tenant):
        reply = await _read(party, uri, report)
        if reply is not None and party.canary in reply.text:
            party.resource_readers.append(uri)
    if party.view.inventory.tool(RECENT_ACTIVITY_TOOL) is not None:  # the audit kept the marker call
        reply = await party.call(RECENT_ACTIVITY_TOOL, {}, report)
        if reply is not None and party.marker in reply.text:
            party.readers[RECENT_ACTIVITY_TOOL] = {}


def _resource_uris(party: Party, tenant: str) -> list[str]:
    uris = []
    for item in party.view.inventory.templates:
        template = item.get("uriTemplate")
        variable = tenant_variable(template) if isinstance(template, str) else None
        if isinstance(template, str) and variable is not None:
            uris.append(instantiate(template, variable, tenant))
    uris.extend(r["uri"] for r in party.view.inventory.resources if isinstance(r.get("uri"), str))
    return uris[:MAX_RESOURCE_READS]


async def _read(party: Party, uri: str, report: Report) -> Reply | None:
    try:
        return await party.client.request("resources/read", {"uri": uri})
    except VerifyError as exc:
        report.notes.append(f"{party.tenant}: resources/read {uri}: {exc}")
        return None


def _leak(
    check: str, victim: Party, attacker: Party, target: str, title: str, seen: str, fix: str
) -> Finding:
    written = f"canary {victim.canary} and marker {victim.marker} were written by {victim.tenant} in this run"
    return Finding(
        check, Severity.HIGH, attacker.tenant, target, title, (seen, written), fix, attacker.view.fix_file
    )


def _leaked(victim: Party, reply: Reply | None) -> bool:
    return reply is not None and (victim.canary in reply.text or victim.marker in reply.text)


async def cross_read(victim: Party, attacker: Party, report: Report) -> None:
    """The attacker names the victim in every tenant-like argument of every tool it is offered, then
    sends exactly the requests through which the victim read its own canary."""
    for tool in attacker.probed_tools():
        name = tool["name"]
        arguments = attacker.arguments(tool, victim.tenant, "", False)
        reply = await attacker.call(name, arguments, report)
        if not _leaked(victim, reply):
            continue
        named = _tenant_arguments(tool, arguments, victim.tenant)
        how = f"with {', '.join(named)} set to {victim.tenant!r}" if named else "without naming anyone"
        title = f"{attacker.tenant} called {name} {how} and got back data {victim.tenant} wrote."
        seen = f"tools/call {name} {_short(arguments)} as {attacker.tenant}: {_excerpt(reply, victim)}"
        fix = (
            names_fix(attacker.view, [n.rsplit(".", 1)[-1] for n in named])
            if named
            else deny_fix(attacker.view, name)
        )
        report.add(_leak("probe-cross-tenant-read", victim, attacker, name, title, seen, fix))
    for name, arguments in victim.readers.items():
        found = any(f.tenant == attacker.tenant and f.target == name for f in report.findings)
        if attacker.view.inventory.tool(name) is None or found or name == RECENT_ACTIVITY_TOOL:
            continue  # the proxy's activity tool has a probe of its own
        reply = await attacker.call(name, arguments, report)
        if _leaked(victim, reply):
            title = (
                f"The call with which {victim.tenant} reads its data returns that data to {attacker.tenant} "
                "too (a shared cache entry or shared upstream state)."
            )
            seen = f"tools/call {name} {_short(arguments)} as {attacker.tenant}: {_excerpt(reply, victim)}"
            report.add(
                _leak("probe-same-call", victim, attacker, name, title, seen, deny_fix(attacker.view, name))
            )


async def cross_resources(victim: Party, attacker: Party, report: Report) -> None:
    """The attacker reads the URIs through which the victim read its canary, and the victim's URIs
    of every template with a tenant variable."""
    uris = list(dict.fromkeys([*victim.resource_readers, *_resource_uris(attacker, victim.tenant)]))
    for uri in uris[:MAX_RESOURCE_READS]:
        reply = await _read(attacker, uri, report)
        if _leaked(victim, reply):
            title = f"{attacker.tenant} read {uri} and got back data {victim.tenant} wrote."
            seen = f"resources/read {uri} as {attacker.tenant}: {_excerpt(reply, victim)}"
            fix = "resources:\n  tenant_uri_templates: [...]   # this URI's template, tenant part {tenant}\n"
            report.add(_leak("probe-cross-tenant-resource", victim, attacker, uri, title, seen, fix))


async def recent_activity(victim: Party, attacker: Party, report: Report) -> None:
    """The proxy's own activity tool, offered to the attacker, must not show the victim's marker."""
    if attacker.view.inventory.tool(RECENT_ACTIVITY_TOOL) is None:
        return
    reply = await attacker.call(RECENT_ACTIVITY_TOOL, {}, report)
    if _leaked(victim, reply):
        title = f"{RECENT_ACTIVITY_TOOL} shows {attacker.tenant} a request only {victim.tenant} made."
        seen = f"{victim.tenant} read {victim.marker_uri}; {attacker.tenant}'s activity lists it"
        fix = "# no policy setting: the proxy's own activity records crossed tenants; report it\n"
        report.add(_leak("probe-recent-activity", victim, attacker, RECENT_ACTIVITY_TOOL, title, seen, fix))


def _tenant_arguments(tool: JsonObject, arguments: JsonObject, tenant: str) -> list[str]:
    """The paths of the arguments the probe set to `tenant`."""
    found = []
    for argument in declared_arguments(tool.get("inputSchema") or {}):
        node: Any = arguments
        for key in argument.path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        if node == tenant:
            found.append(argument.path)
    return found


def _short(arguments: JsonObject) -> str:
    text = json.dumps(arguments, ensure_ascii=False)
    return text if len(text) <= 200 else text[:197] + "..."


def _excerpt(reply: Reply | None, victim: Party) -> str:
    if reply is None:
        return "no answer"
    text = reply.text
    for needle in (victim.canary, victim.marker):
        at = text.find(needle)
        if at >= 0:
            return f"{reply.describe()} holding ...{text[max(0, at - 60) : at + len(needle) + 20]}..."
    return reply.describe()
