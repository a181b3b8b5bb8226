"""verify's static checks, heuristics, report and policy suggestion, from tables (no sockets)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, Field

from proxy.cli import main
from proxy.config import ProxyConfig
from proxy.layers.data_access.policy import load_policy
from proxy.types import Era
from proxy.verify.arguments import Filler, declared_arguments, sample_arguments
from proxy.verify.client import VerifyError
from proxy.verify.inventory import Inventory, TenantView
from proxy.verify.report import Finding, Report, Severity
from proxy.verify.run import tokens_for
from proxy.verify.static import static_findings
from proxy.verify.suggest import suggest_policy
from proxy.verify.words import destructive, history_hint, tenant_word
from tests.factories import DEV_SECRET, DEV_SECRET_ENV, config_dict


class Owner(BaseModel):
    account_id: str = Field(description="Billing account")


class Query(BaseModel):
    owner: Owner | None = None
    workspace: str = Field(description="Where to look")
    labels: dict[str, str] = Field(default_factory=dict)
    children: list[Query] = Field(default_factory=list)


def tool(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"name": name, "description": description, "inputSchema": schema}


def view_of(
    tmp_path: Path,
    policy: dict[str, Any] | None = None,
    upstream: dict[str, Any] | None = None,
    **inventory: Any,
) -> TenantView:
    data = config_dict({"acme": "http://127.0.0.1:9/mcp", "globex": "http://127.0.0.1:9/mcp"})
    if upstream is not None:
        data["tenants"]["acme"]["upstream"] = upstream
    if policy is not None:
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(policy))
        data["policies_dir"] = str(tmp_path)
        data["tenants"]["acme"]["policy"] = "p"
    view = TenantView.of(ProxyConfig.model_validate(data), "acme")
    view.inventory = Inventory(Era.MODERN, **inventory)
    return view


def found(view: TenantView) -> dict[str, Finding]:
    return {f"{f.check}:{f.target}": f for f in static_findings(view, ("globex",))}


@pytest.mark.parametrize(
    ("name", "word"),
    [("tenant_id", "tenant"), ("orgId", "org"), ("tenantid", "tenant"), ("organizationName", "organization"),
     ("customer-uuid", "customer"), ("workspace", "workspace"), ("region", None), ("text", None),
     ("organic", None), ("reorganize", None)],
)  # fmt: skip
def test_tenant_like_names_are_found_by_their_words(name: str, word: str | None) -> None:
    assert tenant_word(name) == word


def test_history_and_destructive_tools_are_told_by_name_and_annotations() -> None:
    assert history_hint("recent_entries", None) == "its name has 'recent'"
    assert history_hint("search_all_notes", None) == "its name has 'all'"
    assert history_hint("summarise", "Activity across all users") is not None
    assert history_hint("list_notes", "An organization's notes.") is None
    assert destructive("delete_note", None) and destructive("anything", {"destructiveHint": True})
    assert not destructive("list_notes", None)
    assert not destructive("anything", {"destructiveHint": True, "readOnlyHint": True})


def test_arguments_are_found_at_any_depth_through_refs_optionals_arrays_and_maps() -> None:
    arguments = {a.path: a for a in declared_arguments(Query.model_json_schema())}
    assert {"owner", "owner.account_id", "workspace", "labels", "labels.*", "children", "children[]"} <= set(
        arguments
    )
    assert arguments["owner.account_id"].refs == ("#/$defs/Query", "#/$defs/Owner")  # a recursive root
    assert arguments["owner.account_id"].tenant_hint() == ("its name has 'account'", True)
    assert arguments["owner"].tenant_hint() is None  # an object holds arguments, it names no one
    assert arguments["labels"].free_form == "is an object with keys of any name"
    assert arguments["workspace"].description == "Where to look"
    assert "children[].owner.account_id" not in arguments  # a recursive model is walked once


def test_free_form_arguments_are_any_value_open_objects_and_json_strings() -> None:
    schema = {
        "type": "object",
        "properties": {
            "anything": {"description": "whatever you like"},
            "options": {"type": "object", "additionalProperties": True},
            "query": {"type": "string", "description": "A JSON filter document"},
            "closed": {
                "type": "object",
                "properties": {"a": {"type": "string"}},
                "additionalProperties": False,
            },
            "optional": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
        },
    }
    loose = {a.path: a.free_form for a in declared_arguments(schema) if a.free_form}
    assert loose == {
        "anything": "takes any JSON value",
        "options": "is an object with keys of any name",
        "query": "is a string holding a JSON document",
    }


def test_sample_arguments_fill_tenant_like_arguments_and_required_ones() -> None:
    schema = Query.model_json_schema()
    filled = sample_arguments(schema, Filler("globex", "", frozenset()))
    assert filled == {"workspace": "globex"}  # required, and tenant-like (by name)
    written = sample_arguments(schema, Filler("acme", "CANARY", frozenset(), optional=True))
    assert written["workspace"] == "acme"


def test_open_tenant_arguments_are_high_by_name_medium_by_description_and_covered_ones_pass(
    tmp_path: Path,
) -> None:
    tools = [
        tool("search", Query.model_json_schema()),
        tool(
            "note",
            {"type": "object", "properties": {"about": {"type": "string", "description": "The tenant"}}},
        ),
    ]
    findings = found(view_of(tmp_path, tools=tools))
    assert findings["open-tenant-argument:search:workspace"].severity is Severity.HIGH
    assert findings["open-tenant-argument:search:owner.account_id"].severity is Severity.HIGH
    assert findings["open-tenant-argument:note:about"].severity is Severity.MEDIUM
    assert (
        "reached through $ref #/$defs/Query, #/$defs/Owner"
        in findings["open-tenant-argument:search:owner.account_id"].evidence
    )
    covered = found(
        view_of(tmp_path, {"tenant_arguments": {"names": ["workspace", "account_id"]}}, tools=tools)
    )
    assert [key for key in covered if key.startswith("open-tenant-argument:search")] == []
    fix = covered["open-tenant-argument:note:about"].fix
    assert 'names: ["workspace", "account_id", "about"]' in fix and str(tmp_path / "p.yaml") in str(
        covered["open-tenant-argument:note:about"].fix_file
    )


def test_prompt_arguments_are_checked_like_tool_arguments(tmp_path: Path) -> None:
    prompts = [{"name": "summary", "arguments": [{"name": "org_id", "required": True}, {"name": "topic"}]}]
    assert "open-tenant-argument:summary:org_id" in found(view_of(tmp_path, prompts=prompts))


@pytest.mark.parametrize(
    ("template", "policy_templates", "fix"),
    [
        ("ledger://{org_id}/entries", [], "ledger://{tenant}/entries"),
        ("ledger://{org_id}/entries", ["ledger://{tenant}/{rest}"], None),
        ("files://{org_id}{/path*}", [], "files://{tenant}{/path}"),
        ("docs://{section}/{page}", [], None),
    ],
)
def test_resource_templates_with_a_tenant_variable_must_be_tenant_scoped(
    tmp_path: Path, template: str, policy_templates: list[str], fix: str | None
) -> None:
    policy = {"resources": {"tenant_uri_templates": policy_templates}}
    findings = found(view_of(tmp_path, policy, templates=[{"uriTemplate": template, "name": "t"}]))
    finding = findings.get(f"open-tenant-uri-template:{template}")
    if fix is None:
        assert finding is None
    else:
        assert finding is not None and fix in finding.fix
        assert load_policy_snippet(tmp_path, finding.fix) is not None


def load_policy_snippet(tmp_path: Path, snippet: str) -> object:
    path = tmp_path / "snippet.yaml"
    path.write_text(snippet)
    return load_policy(path)


def test_resources_naming_another_tenant_are_reported(tmp_path: Path) -> None:
    resources = [{"uri": "notes://globex/plan"}, {"uri": "notes://acme/plan"}, {"uri": "docs://globexcorp/x"}]
    findings = found(view_of(tmp_path, resources=resources))
    assert [k for k in findings if k.startswith("foreign-resource-listed")] == [
        "foreign-resource-listed:notes://globex/plan"
    ]


def test_a_cached_tool_whose_result_looks_caller_specific_is_reported(tmp_path: Path) -> None:
    policy = {"tools": {"cache_ttl_seconds": {"current_user_profile": 30, "list_regions": 60}}}
    tools = [tool("current_user_profile", {"type": "object"}), tool("list_regions", {"type": "object"})]
    findings = found(view_of(tmp_path, policy, tools=tools))
    finding = findings["cached-caller-specific:current_user_profile"]
    assert "cached-caller-specific:list_regions" not in findings
    assert finding.fix.startswith('tools:\n  cache_ttl_seconds: {"list_regions": 60}')


@pytest.mark.parametrize(
    ("capabilities", "severity"),
    [(None, Severity.MEDIUM), ({"roots": "allow", "sampling": "deny"}, Severity.HIGH),
     ({"roots": ["file:///srv/shared"], "sampling": "deny"}, Severity.MEDIUM),
     ({"roots": ["file:///srv/{tenant}"], "sampling": "deny"}, None), ({"sampling": "deny"}, None)],
)  # fmt: skip
def test_stdio_upstreams_get_no_roots_or_sampling_by_default(
    tmp_path: Path, capabilities: dict[str, Any] | None, severity: Severity | None
) -> None:
    policy = {"client_capabilities": capabilities} if capabilities is not None else None
    stdio = {"command": ["python", "-m", "server"]}
    finding = found(view_of(tmp_path, policy, upstream=stdio)).get(
        "stdio-client-capability:client_capabilities"
    )
    assert (finding.severity if finding else None) is severity
    http = found(view_of(tmp_path, policy))
    assert "stdio-client-capability:client_capabilities" not in http


def test_report_ids_are_stable_and_accepted_findings_no_longer_fail() -> None:
    finding = Finding("shared-history-tool", Severity.MEDIUM, "acme", "recent", "t", ("e",), "fix")
    report = Report("http://x/mcp", ("acme",), False)
    report.add(finding)
    report.add(finding)
    assert report.exit_code == 1 and len(report.findings) == 1
    assert report.as_json()["findings"][0]["id"] == "shared-history-tool:acme:recent"
    report.accepted = frozenset({finding.id})
    assert report.exit_code == 0
    assert report.as_json()["accepted"] == [finding.id]
    assert "0 findings (0 high, 0 medium, 0 low), 1 accepted: exit 0" in report.text()


def test_suggested_policy_loads_and_covers_what_the_upstream_declares(tmp_path: Path) -> None:
    tools = [
        tool("search", Query.model_json_schema()),
        tool("recent_activity_feed", {"type": "object"}),
    ]
    templates = [{"uriTemplate": "ledger://{org_id}/entries"}]
    view = view_of(tmp_path, upstream={"command": ["server"]}, tools=tools, templates=templates)
    text = suggest_policy(view)
    policy = load_policy_snippet(tmp_path, text)
    spec = yaml.safe_load(text)
    assert spec["tenant_arguments"]["names"] == ["account_id", "workspace"]
    assert spec["tenant_arguments"]["hide_from_schema"] is True
    assert spec["resources"]["tenant_uri_templates"] == ["ledger://{tenant}/entries"]
    assert spec["client_capabilities"] == {"roots": "deny", "sampling": "deny", "elicitation": "allow"}
    assert "#   recent_activity_feed (its name has 'recent')" in text
    assert "#   account_id: tool search (owner.account_id, through #/$defs/Owner)" in text
    assert policy is not None


def test_tokens_are_minted_with_an_issuer_that_can_sign_or_the_reason_is_given(tmp_path: Path) -> None:
    config = ProxyConfig.model_validate(config_dict({"acme": "http://127.0.0.1:9/mcp"}))
    assert tokens_for(config, ("acme",), {"acme": "given"}) == {"acme": "given"}
    minted = tokens_for(config, ("acme",), {}, env={DEV_SECRET_ENV: DEV_SECRET})
    assert minted["acme"].count(".") == 2
    with pytest.raises(
        VerifyError, match=r"no token for tenant acme: give --token acme=TOKEN \(issuer dev: "
    ):
        tokens_for(config, ("acme",), {}, env={})


def test_verify_that_cannot_run_exits_2_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.upstreams import free_port

    data = config_dict({"acme": "http://127.0.0.1:9/mcp", "globex": "http://127.0.0.1:9/mcp"})
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(data))
    closed = f"http://127.0.0.1:{free_port()}/mcp"
    base = ["verify", "--config", str(path), "--url", closed, "--token", "acme=t", "--token", "globex=t"]
    assert main([*base, "--tenants", "acme,initech"]) == 2
    assert "tenant 'initech' is not configured" in capsys.readouterr().err
    assert main([*base, "--tenants", "acme", "--probe"]) == 2
    assert "--probe needs two tenants" in capsys.readouterr().err
    assert main([*base, "--tenants", "acme,globex", "--json"]) == 2
    captured = capsys.readouterr()
    assert f"verify: tenant acme at {closed}: the server is unreachable" in captured.err
    assert '"exit_code": 2' in captured.out
