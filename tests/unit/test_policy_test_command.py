"""`policy test` and `policy explain`: cases in YAML run against the policy engine, no upstream."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import yaml

from proxy.cli import main
from tests.factories import config_dict

POLICY = {
    "tenant_arguments": {"names": ["tenant_id"], "on_mismatch": "reject", "hide_from_schema": True},
    "tools": {"allow": ["*"], "deny": ["drop_*"]},
    "resources": {"tenant_uri_templates": ["notes://{tenant}/{path}"]},
}
NOTE_QUERY_SCHEMA = {
    "type": "object",
    "properties": {"query": {"$ref": "#/$defs/NoteQuery"}},
    "required": ["query"],
    "$defs": {
        "NoteQuery": {
            "type": "object",
            "properties": {"tenant_id": {"type": "string"}, "text": {"type": "string"}},
            "required": ["tenant_id"],
        }
    },
}


def call(name: str, arguments: dict[str, object]) -> dict[str, object]:
    return {"method": "tools/call", "params": {"name": name, "arguments": arguments}}


CASES = [
    {
        "name": "another tenant is refused",
        "tenant": "acme",
        "request": call("list_notes", {"tenant_id": "globex"}),
        "expect": {"deny": "tenant_arguments", "spoof": True, "argument": "tenant_id"},
    },
    {
        "name": "a tenant argument left out of a $ref model is filled in",
        "tenant": "acme",
        "request": call("search_notes", {"query": {"text": "plan"}}),
        "expect": {"rewrite": {"arguments": {"query": {"text": "plan", "tenant_id": "acme"}}}},
    },
    {
        "name": "a denied tool",
        "tenant": "acme",
        "request": call("drop_everything", {}),
        "expect": {"deny": "tools.deny"},
    },
    {
        "name": "its own resource",
        "tenant": "acme",
        "request": {"method": "resources/read", "params": {"uri": "notes://acme/plan"}},
        "expect": "allow",
    },
    {
        "name": "another tenant's resource",
        "tenant": "acme",
        "request": {"method": "resources/read", "params": {"uri": "notes://globex/plan"}},
        "expect": {"deny": "resources.tenant_uri_templates"},
    },
    {
        "name": "tenant completions are answered by the proxy",
        "tenant": "acme",
        "request": {
            "method": "completion/complete",
            "params": {
                "ref": {"type": "ref/prompt", "name": "p"},
                "argument": {"name": "tenant_id", "value": "a"},
            },
        },
        "expect": {"answer": {"completion": {"values": ["acme"], "total": 1, "hasMore": False}}},
    },
    {
        "name": "an elicitation answer naming another tenant",
        "tenant": "acme",
        "client_answer": {"action": "accept", "content": {"tenant_id": "globex"}},
        "expect": {"deny": "tenant_arguments"},
    },
]


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policies" / "default.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(POLICY))
    return path


def write_tests(tmp_path: Path, name: str, cases: Sequence[Mapping[str, object]], **top: object) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({**top, "schemas": {"search_notes": NOTE_QUERY_SCHEMA}, "cases": cases}))
    return path


def test_every_case_passes_when_the_policy_decides_as_expected(
    policy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tests = write_tests(tmp_path, "notes_test.yaml", CASES, policy="policies/default.yaml")
    assert main(["policy", "test", str(tests)]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS ") == len(CASES)
    assert f"{len(CASES)} cases: {len(CASES)} passed, 0 failed" in out


def test_a_case_the_policy_decides_otherwise_fails_naming_both_decisions(
    policy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = [
        {**CASES[0], "name": "expects the spoof to pass", "expect": "allow"},
        {**CASES[1], "name": "expects the wrong fill", "expect": {"rewrite": {"arguments": {"query": {}}}}},
        {**CASES[2], "name": "expects another rule", "expect": {"deny": "tools.allow"}},
        CASES[3],
    ]
    tests = write_tests(tmp_path, "wrong_test.yaml", wrong, policy="policies/default.yaml")
    assert main(["policy", "test", str(tests)]) == 1
    out = capsys.readouterr().out
    assert "FAIL " in out and "expects the spoof to pass: expected allow, got deny by tenant_arguments" in out
    assert 'expects the wrong fill: expected arguments rewritten to {"query": {}}, got rewrite to' in out
    assert "expects another rule: expected deny by tools.allow, got deny by tools.deny" in out
    assert f"PASS {tests}: its own resource" in out
    assert "4 cases: 1 passed, 3 failed" in out


def test_cases_take_each_tenants_policy_from_a_config(
    policy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_dict({"acme": "http://127.0.0.1:9/mcp", "globex": "http://127.0.0.1:9/mcp"})
    config["policies_dir"] = str(policy_file.parent)
    config["tenants"]["acme"]["policy"] = "default"  # globex has none: the proxy enforces nothing for it
    (tmp_path / "proxy.yaml").write_text(yaml.safe_dump(config))
    cases = [CASES[0], {**CASES[0], "name": "globex has no policy", "tenant": "globex", "expect": "allow"}]
    tests = write_tests(tmp_path, "config_test.yaml", cases, config="proxy.yaml")
    assert main(["policy", "test", str(tests)]) == 0, capsys.readouterr().out


def test_a_malformed_test_file_cannot_run_and_names_the_key(
    policy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = [{"tenant": "acme", "request": call("x", {}), "expect": {"deny": "tools.deny", "allow": True}}]
    tests = write_tests(tmp_path, "bad_test.yaml", bad, policy="policies/default.yaml")
    assert main(["policy", "test", str(tests)]) == 2
    err = capsys.readouterr().err
    assert f"{tests}: cases.0.expect" in err and "exactly one of allow, rewrite, deny, answer" in err
    assert err.count("\n") == 1


def test_explain_prints_the_deciding_rule(policy_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    request = json.dumps(call("list_notes", {"tenant_id": "globex"}))
    assert (
        main(["policy", "explain", "--policy", str(policy_file), "--tenant", "acme", "--request", request])
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert "decision: deny" in out
    assert "rule: tenant_arguments" in out
    assert "reason: argument 'tenant_id' must name the caller's tenant (rule tenant_arguments)" in out


def test_explain_shows_a_rewrite_with_the_tools_schema(
    policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    request = json.dumps(call("search_notes", {"query": {"text": "plan"}}))
    args = ["--tenant", "acme", "--request", request, "--schema", json.dumps(NOTE_QUERY_SCHEMA), "--json"]
    assert main(["policy", "explain", "--policy", str(policy_file), *args]) == 0
    explained = json.loads(capsys.readouterr().out)
    assert explained["decision"] == "rewrite"
    assert explained["rewrites"] == ['arguments.query.tenant_id <- "acme"']
    assert explained["params"]["arguments"] == {"query": {"text": "plan", "tenant_id": "acme"}}


def test_the_shipped_policies_pass_their_own_cases(capsys: pytest.CaptureFixture[str]) -> None:
    shipped = sorted((Path(__file__).resolve().parents[2] / "policies" / "tests").glob("*_test.yaml"))
    assert len(shipped) == 2
    assert main(["policy", "test", *map(str, shipped)]) == 0, capsys.readouterr().out
