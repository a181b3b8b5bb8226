"""`verify` and `policy suggest` against a running proxy in front of a real SDK upstream that two
tenants share and that trusts every organisation id it is given (tests/ledger_upstream.py)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.verify.report import Report
from proxy.verify.run import tokens_for, verify
from proxy.verify.suggest import inspect_upstream, suggest_policy
from tests.conftest import RunningProxy, StartProxy
from tests.ledger_upstream import start_ledger_upstream

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent.parent
TENANTS = ("acme", "globex")
TENANT_FINDINGS = ("open-tenant-argument", "open-tenant-uri-template")


@pytest.fixture
def ledger(upstream_runner: Any) -> Any:
    """A fresh ledger per test: what one test's probes wrote never shows up in another's."""
    return start_ledger_upstream(upstream_runner)


def config_file(proxy: RunningProxy, tmp_path: Path) -> Path:
    """The running proxy's config as the YAML file an operator would give `verify`."""
    path = tmp_path / f"proxy-{proxy.url.rsplit(':', 1)[1].split('/')[0]}.yaml"
    path.write_text(yaml.safe_dump(proxy.config.model_dump(mode="json")))
    return path


async def cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def run_verify(proxy: RunningProxy, probes: bool = False, url: str | None = None) -> Report:
    tokens = tokens_for(proxy.config, TENANTS, {})
    return await verify(proxy.config, TENANTS, url or proxy.url, tokens, probes=probes, request_timeout=20)


def ids(report: Report | dict[str, Any], check: str) -> set[str]:
    findings = report["findings"] if isinstance(report, dict) else [f.as_json() for f in report.open_findings]
    return {f["id"] for f in findings if f["check"] == check}


async def test_verify_names_each_open_tenant_argument_and_exits_1(
    ledger: Any, make_proxy: StartProxy, tmp_path: Path
) -> None:
    proxy = await make_proxy({"acme": ledger, "globex": ledger})
    code, out, err = await cli(
        "verify", "--config", str(config_file(proxy, tmp_path)), "--tenants", "acme,globex", "--json"
    )
    assert code == 1, err
    report = json.loads(out)
    open_arguments = ids(report, "open-tenant-argument")
    for tenant in TENANTS:
        assert f"open-tenant-argument:{tenant}:record_entry:org_id" in open_arguments
        assert f"open-tenant-argument:{tenant}:find_entries:filter.org_id" in open_arguments
        assert f"open-tenant-uri-template:{tenant}:ledger://{{org_id}}/entries" in ids(
            report, "open-tenant-uri-template"
        )
        assert f"shared-history-tool:{tenant}:recent_entries" in ids(report, "shared-history-tool")
        assert f"free-form-argument:{tenant}:export_report:options" in ids(report, "free-form-argument")
    through_ref = next(
        f for f in report["findings"] if f["id"] == "open-tenant-argument:acme:find_entries:filter.org_id"
    )
    assert any("$ref #/$defs/EntryFilter" in line for line in through_ref["evidence"])
    assert f"the upstream ({ledger.url}) also serves globex" in through_ref["evidence"]
    assert 'names: ["org_id"]' in through_ref["fix"]
    assert report["probed"] is False
    assert not any(
        r.text.count("verify-canary") for r in ledger.recorder.snapshot()
    )  # static: nothing written


async def test_the_suggested_policy_leaves_no_open_tenant_argument(
    ledger: Any, make_proxy: StartProxy, tmp_path: Path
) -> None:
    unprotected = await make_proxy({"acme": ledger, "globex": ledger})
    code, suggested, err = await cli(
        "policy", "suggest", "--config", str(config_file(unprotected, tmp_path)), "--tenant", "acme"
    )
    assert code == 0, err
    policy = yaml.safe_load(suggested)
    assert policy["tenant_arguments"]["names"] == ["org_id"]
    assert policy["resources"]["tenant_uri_templates"] == ["ledger://{tenant}/entries"]
    assert "recent_entries (its name has 'recent')" in suggested  # a comment to review, not a rule
    protected = await make_proxy({"acme": ledger, "globex": ledger}, policies=dict.fromkeys(TENANTS, policy))
    report = await run_verify(protected)
    for check in TENANT_FINDINGS:
        assert ids(report, check) == set(), report.text()
    assert report.exit_code == 1  # the shared history tool and the free-form options are still there
    remaining = frozenset(f.id for f in report.open_findings)
    assert {f.check for f in report.open_findings} == {"shared-history-tool", "free-form-argument"}
    tokens = tokens_for(protected.config, TENANTS, {})
    accepted = await verify(protected.config, TENANTS, protected.url, tokens, accepted=remaining)
    assert accepted.exit_code == 0


async def test_probes_show_a_real_leak_and_none_once_protected(
    ledger: Any, make_proxy: StartProxy, tmp_path: Path
) -> None:
    unprotected = await make_proxy({"acme": ledger, "globex": ledger})
    report = await run_verify(unprotected, probes=True)
    leaks = ids(report, "probe-cross-tenant-read")
    for attacker in TENANTS:
        assert f"probe-cross-tenant-read:{attacker}:find_entries" in leaks
        assert f"probe-cross-tenant-read:{attacker}:recent_entries" in leaks  # no argument: a shared log
    assert {
        f"probe-cross-tenant-resource:{t}:ledger://{o}/entries" for t, o in (TENANTS, TENANTS[::-1])
    } <= ids(report, "probe-cross-tenant-resource")
    leak = next(f for f in report.open_findings if f.id == "probe-cross-tenant-read:globex:find_entries")
    assert "filter.org_id set to 'acme'" in leak.title
    victim_canary = leak.evidence[1].split()[1]
    assert victim_canary in leak.evidence[0]

    policy = {
        "tenant_arguments": {"names": ["org_id"], "hide_from_schema": True},
        "tools": {"deny": ["recent_entries"]},
        "resources": {"tenant_uri_templates": ["ledger://{tenant}/entries"]},
        "recent_activity": {"enabled": True},
    }
    protected = await make_proxy(
        {"acme": ledger, "globex": ledger},
        policies=dict.fromkeys(TENANTS, policy),
        audit={"dir": str(tmp_path / "audit")},
    )
    report = await run_verify(protected, probes=True)
    assert [f.id for f in report.open_findings if f.check.startswith("probe-")] == [], report.text()
    for tenant in TENANTS:  # what each could read of its own, the other could not
        read_back = next(note for note in report.notes if note.startswith(f"{tenant}: wrote canary"))
        # (proxy_recent_activity is no reader: it never echoes the probe's marker URI, which the
        # tenant's catalog does not know)
        assert "read back through: find_entries, ledger://" in read_back


async def test_session_replay_probe_catches_a_deployment_that_trusts_session_ids(
    ledger: Any, make_proxy: StartProxy
) -> None:
    """Reached without the proxy, the SDK server serves any holder of a session id: the probe says so."""
    proxy = await make_proxy({"acme": ledger, "globex": ledger})
    report = await run_verify(proxy, probes=True, url=ledger.url)
    replays = ids(report, "probe-session-replay")
    assert {
        "probe-session-replay:globex:Mcp-Session-Id:POST",
        "probe-session-replay:globex:Mcp-Session-Id:DELETE",
    } <= replays
    through_proxy = await run_verify(proxy, probes=True)
    assert ids(through_proxy, "probe-session-replay") == set()


async def test_a_stdio_tenant_gets_a_policy_from_its_own_process_and_no_client_capabilities(
    ledger: Any, make_proxy: StartProxy
) -> None:
    stdio_server = str(ROOT / "tests" / "stdio_server.py")
    tenants = {
        "acme": {"upstream": {"url": ledger.url}},
        "globex": {"upstream": {"command": [sys.executable, stdio_server, "globex", "STDIO-CANARY"]}},
    }
    proxy = await make_proxy({"acme": ledger, "globex": ledger}, tenants=tenants)
    view = await inspect_upstream(proxy.config, "globex", 20)  # the process itself, not the proxy
    suggested = yaml.safe_load(suggest_policy(view))
    assert suggested["tenant_arguments"]["names"] == ["tenant_id"]
    assert suggested["resources"]["tenant_uri_templates"] == ["notes://{tenant}/{name}"]
    assert suggested["client_capabilities"]["sampling"] == "deny"
    report = await run_verify(proxy)
    assert "stdio-client-capability:globex:client_capabilities" in ids(report, "stdio-client-capability")
    assert "open-tenant-argument:globex:search_notes:query.tenant_id" in ids(report, "open-tenant-argument")
    protected = await make_proxy(
        {"acme": ledger, "globex": ledger}, policies={"globex": suggested}, tenants=tenants
    )
    after = await run_verify(protected)
    globex = {f.id for f in after.open_findings if f.tenant == "globex"}
    assert not {i for i in globex if i.startswith(("open-tenant", "stdio-client"))}, after.text()


async def test_task_replay_probe_catches_a_server_that_answers_any_holder_of_a_task_id(
    upstream_runner: Any, make_proxy: StartProxy
) -> None:
    """FastMCP with fastmcp-tasks answers tasks/get for any id it issued, whoever asks: reached
    directly, the probe's replay of one tenant's task id as the other reads it; through the proxy,
    whose task ids are bound to their caller, it finds nothing."""
    from tests.task_upstreams import start_fastmcp_tasks

    server = start_fastmcp_tasks(upstream_runner, "CANARY-verify-tasks")
    proxy = await make_proxy({"acme": server, "globex": server})
    direct = await run_verify(proxy, probes=True, url=server.url)
    assert ids(direct, "probe-task-replay"), direct.text()
    through_proxy = await run_verify(proxy, probes=True)
    assert ids(through_proxy, "probe-task-replay") == set(), through_proxy.text()
    assert any(
        n.startswith("task replay: ") and n.endswith("of acme asked for as globex")
        for n in through_proxy.notes
    ), through_proxy.notes
