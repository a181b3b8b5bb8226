"""evaluate() and the result filters, from tables (THREATS.md section B and E)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.policy.engine import (
    Action,
    Decision,
    declared_tenant_paths,
    evaluate,
    filter_result,
    foreign_uri,
    hide_tenant_properties,
)
from proxy.policy.model import PolicyFile, compile_policy, compile_uri_template

NAMES = ("tenant_id", "tenantId", "org_id")


def policy(on_mismatch: str = "reject", **overrides: Any) -> Any:
    spec = {
        "tenant_arguments": {"names": list(NAMES), "on_mismatch": on_mismatch, "hide_from_schema": True},
        "tools": {"allow": ["*"], "deny": ["drop_*"]},
        "resources": {"tenant_uri_templates": ["notes://{tenant}/{path}", "db://records?tenant={tenant}"]},
    }
    spec.update(overrides)
    return compile_policy("test", PolicyFile.model_validate(spec))


REJECT, REWRITE = policy("reject"), policy("rewrite")
SCHEMA_PATHS = (("arguments", "tenant_id"),)


def call(arguments: Any, name: str = "list_notes") -> dict[str, Any]:
    return {"name": name, "arguments": arguments}


# (case, arguments, expected argument path in the refusal) -- each value names a tenant other than acme.
SPOOFS = [
    ("another tenant", {"tenant_id": "globex"}, "tenant_id"),
    ("alias", {"tenantId": "globex"}, "tenantId"),
    ("second alias", {"org_id": "globex"}, "org_id"),
    ("nested", {"filter": {"scope": {"tenant_id": "globex"}}}, "filter.scope.tenant_id"),
    ("inside an array", {"items": [{"x": 1}, {"tenant_id": "globex"}]}, "items[1].tenant_id"),
    ("array of arrays", {"m": [[{"org_id": "globex"}]]}, "m[0][0].org_id"),
    ("case variant", {"tenant_id": "ACME"}, "tenant_id"),
    ("leading whitespace", {"tenant_id": " acme"}, "tenant_id"),
    ("trailing newline", {"tenant_id": "acme\n"}, "tenant_id"),
    ("cyrillic a", {"tenant_id": "\u0430cme"}, "tenant_id"),
    ("fullwidth", {"tenant_id": "\uff41cme"}, "tenant_id"),
    ("zero-width joiner", {"tenant_id": "ac\u200dme"}, "tenant_id"),
    ("percent-encoded", {"tenant_id": "%61cme"}, "tenant_id"),
    ("list holding the tenant", {"tenant_id": ["acme"]}, "tenant_id"),
    ("object holding the tenant", {"tenant_id": {"id": "acme"}}, "tenant_id"),
    ("number", {"tenant_id": 1}, "tenant_id"),
    ("boolean", {"tenant_id": True}, "tenant_id"),
    ("null", {"tenant_id": None}, "tenant_id"),
    ("empty string", {"tenant_id": ""}, "tenant_id"),
    (
        "own at top, foreign nested",
        {"tenant_id": "acme", "q": {"tenantId": "globex"}},
        "q.tenantId",
    ),
]


@pytest.mark.parametrize(("case", "arguments", "where"), SPOOFS, ids=[s[0] for s in SPOOFS])
def test_reject_mode_refuses_every_variant_naming_the_argument(case: str, arguments: Any, where: str) -> None:
    decision = evaluate(REJECT, "acme", "tools/call", call(arguments), SCHEMA_PATHS)
    assert decision.action is Action.DENY
    assert (decision.rule, decision.argument, decision.spoof) == ("tenant_arguments", where, True)
    assert "globex" not in decision.reason


@pytest.mark.parametrize(("case", "arguments", "where"), SPOOFS, ids=[s[0] for s in SPOOFS])
def test_rewrite_mode_replaces_every_variant_with_the_caller(case: str, arguments: Any, where: str) -> None:
    params = call(copy.deepcopy(arguments))
    decision = evaluate(REWRITE, "acme", "tools/call", params, SCHEMA_PATHS)
    assert decision.action is Action.REWRITE
    assert decision.spoof
    assert decision.argument == where
    rewritten = apply(params, decision)
    assert_only_tenant(rewritten["arguments"], "acme")


def apply(params: dict[str, Any], decision: Decision) -> dict[str, Any]:
    from proxy.policy.enforce import _set

    result = copy.deepcopy(params)
    for rewrite in decision.rewrites:
        _set(result, rewrite.path, rewrite.value)
    return result


def assert_only_tenant(value: Any, tenant: str) -> None:
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, child in node.items():
                if key in NAMES:
                    assert child == tenant
                else:
                    stack.append(child)
        elif isinstance(node, list):
            stack.extend(node)


@pytest.mark.parametrize(
    ("params", "declared", "action"),
    [
        (call({"tenant_id": "acme"}), SCHEMA_PATHS, Action.FORWARD),
        (call({"text": "hi"}), (), Action.FORWARD),
        (call({"tenant_id": "acme", "deep": [{"org_id": "acme"}]}), SCHEMA_PATHS, Action.FORWARD),
        (call({"text": "hi"}), SCHEMA_PATHS, Action.REWRITE),  # declared and absent: filled in
        ({"name": "list_notes"}, SCHEMA_PATHS, Action.REWRITE),  # no arguments object at all
        (call({"tenant": "globex"}), (), Action.FORWARD),  # not a configured name
    ],
)
def test_own_tenant_passes_and_declared_absent_is_filled(params: Any, declared: Any, action: Action) -> None:
    decision = evaluate(REJECT, "acme", "tools/call", params, declared)
    assert decision.action is action
    assert not decision.spoof
    if action is Action.REWRITE:
        assert apply(params, decision)["arguments"]["tenant_id"] == "acme"


def test_nested_declared_argument_is_filled_only_where_its_object_exists() -> None:
    declared = (("arguments", "scope", "tenant_id"),)
    assert evaluate(REJECT, "acme", "tools/call", call({"x": 1}), declared).action is Action.FORWARD
    decision = evaluate(REJECT, "acme", "tools/call", call({"scope": {}}), declared)
    assert apply(call({"scope": {}}), decision)["arguments"]["scope"] == {"tenant_id": "acme"}


@pytest.mark.parametrize(("name", "rule"), [("drop_table", "tools.deny"), ("list_notes", None)])
def test_tool_globs(name: str, rule: str | None) -> None:
    decision = evaluate(REJECT, "acme", "tools/call", call({}, name=name))
    assert decision.rule == rule
    assert decision.action is (Action.DENY if rule else Action.FORWARD)


def test_allow_list_refuses_what_it_does_not_name() -> None:
    narrow = policy(tools={"allow": ["list_*"], "deny": []})
    assert evaluate(narrow, "acme", "tools/call", call({}, name="delete_all")).rule == "tools.allow"
    assert evaluate(narrow, "acme", "tools/call", call({}, name="list_notes")).action is Action.FORWARD


def test_prompts_get_arguments_are_tenant_checked() -> None:
    params = {"name": "summarize", "arguments": {"tenant_id": "globex"}}
    assert evaluate(REJECT, "acme", "prompts/get", params).action is Action.DENY
    decision = evaluate(REJECT, "acme", "prompts/get", {"name": "s", "arguments": {}}, SCHEMA_PATHS)
    assert decision.action is Action.REWRITE


@pytest.mark.parametrize(
    ("uri", "refused"),
    [
        ("notes://acme/plan", False),
        ("notes://acme/a/b/c", False),
        ("notes://acme/plan?rev=2", False),
        ("notes://globex/plan", True),
        ("NOTES://globex/plan", True),
        ("notes://Acme/plan", True),
        ("notes://acme/../globex/plan", True),
        ("notes://acme/%2e%2e/globex/plan", True),
        ("notes://acme/%252e%252e/globex", True),
        ("notes://acme/..%2Fglobex/plan", True),
        ("notes://acme%2Fglobex/plan", True),
        ("notes://acme\\..\\globex", True),
        ("notes://acme@globex/plan", True),
        (" notes://globex/plan", True),
        ("notes://globex", True),  # scoped scheme, matches no template: cannot be attributed
        ("notes:globex/plan", True),
        ("notes://acme/plan\r\nx", True),
        ("file:///etc/passwd", False),  # not a tenant-scoped scheme: the upstream decides
        ("db://records?tenant=acme", False),
        ("db://records?tenant=globex", True),
        ("db://records?tenant=acme&tenant=globex", True),
    ],
)
def test_resource_uris(uri: str, refused: bool) -> None:
    assert foreign_uri(REJECT, "acme", uri) is refused
    decision = evaluate(REJECT, "acme", "resources/read", {"uri": uri})
    assert decision.action is (Action.HIDE_RESOURCE if refused else Action.FORWARD)
    assert evaluate(REJECT, "acme", "resources/subscribe", {"uri": uri}).action is decision.action


def test_completion_of_a_tenant_argument_is_answered_locally_with_the_caller_only() -> None:
    params = {
        "ref": {"type": "ref/prompt", "name": "summarize"},
        "argument": {"name": "tenant_id", "value": ""},
    }
    decision = evaluate(REJECT, "acme", "completion/complete", params)
    assert decision.action is Action.ANSWER
    assert decision.answer == {"completion": {"values": ["acme"], "total": 1, "hasMore": False}}
    params["argument"] = {"name": "org_id", "value": "glo"}
    assert evaluate(REJECT, "acme", "completion/complete", params).answer["completion"]["values"] == []  # type: ignore[index]


def test_completion_context_arguments_and_resource_refs() -> None:
    foreign_context = {
        "ref": {"type": "ref/prompt", "name": "s"},
        "argument": {"name": "topic", "value": "x"},
        "context": {"arguments": {"tenant_id": "globex"}},
    }
    assert evaluate(REJECT, "acme", "completion/complete", foreign_context).action is Action.DENY
    foreign_ref = {
        "ref": {"type": "ref/resource", "uri": "notes://globex/{path}"},
        "argument": {"name": "path", "value": ""},
    }
    assert evaluate(REJECT, "acme", "completion/complete", foreign_ref).action is Action.HIDE_RESOURCE
    variable_ref = {
        "ref": {"type": "ref/resource", "uri": "notes://{owner}/{path}"},
        "argument": {"name": "owner", "value": "a"},
    }
    decision = evaluate(REJECT, "acme", "completion/complete", variable_ref)
    assert decision.action is Action.ANSWER
    assert decision.answer["completion"]["values"] == ["acme"]  # type: ignore[index]


def test_declared_paths_and_hiding_follow_properties_chains() -> None:
    schema = {
        "type": "object",
        "properties": {
            "tenant_id": {"type": "string", "x-mcp-header": "Tenant"},
            "text": {"type": "string"},
            "scope": {
                "type": "object",
                "properties": {"org_id": {"type": "string"}, "q": {"type": "string"}},
            },
        },
        "required": ["tenant_id", "text"],
    }
    names = frozenset(NAMES)
    assert declared_tenant_paths(schema, names) == (
        ("arguments", "scope", "org_id"),
        ("arguments", "tenant_id"),
    )
    hidden = hide_tenant_properties(schema, names)
    assert set(hidden["properties"]) == {"text", "scope"}
    assert hidden["required"] == ["text"]
    assert set(hidden["properties"]["scope"]["properties"]) == {"q"}
    assert "tenant_id" in schema["properties"]  # the input is not mutated


def test_list_results_are_filtered_for_the_caller() -> None:
    tools = {
        "tools": [
            {
                "name": "list_notes",
                "inputSchema": {
                    "type": "object",
                    "properties": {"tenant_id": {}, "q": {}},
                    "required": ["tenant_id"],
                },
            },
            {"name": "drop_table", "inputSchema": {}},
        ],
        "nextCursor": "2",
    }
    filtered = filter_result(REJECT, "acme", "tools/list", tools)
    assert [t["name"] for t in filtered["tools"]] == ["list_notes"]
    assert filtered["tools"][0]["inputSchema"]["properties"] == {"q": {}}
    assert filtered["nextCursor"] == "2"
    resources = {"resources": [{"uri": "notes://acme/a"}, {"uri": "notes://globex/b"}, {"uri": "other://x"}]}
    assert [r["uri"] for r in filter_result(REJECT, "acme", "resources/list", resources)["resources"]] == [
        "notes://acme/a",
        "other://x",
    ]
    templates = {
        "resourceTemplates": [
            {"uriTemplate": "notes://{tenant_id}/{name}"},
            {"uriTemplate": "notes://globex/{name}"},
        ]
    }
    kept = filter_result(REJECT, "acme", "resources/templates/list", templates)["resourceTemplates"]
    assert kept == [{"uriTemplate": "notes://{tenant_id}/{name}"}]
    read = {"contents": [{"uri": "notes://acme/a", "text": "x"}, {"uri": "notes://globex/a", "text": "y"}]}
    assert filter_result(REJECT, "acme", "resources/read", read)["contents"] == [
        {"uri": "notes://acme/a", "text": "x"}
    ]
    prompts = {"prompts": [{"name": "s", "arguments": [{"name": "tenant_id"}, {"name": "topic"}]}]}
    assert filter_result(REJECT, "acme", "prompts/list", prompts)["prompts"][0]["arguments"] == [
        {"name": "topic"}
    ]


@pytest.mark.parametrize(
    "template",
    [
        "notes://{path}",
        "notes://{tenant}/{tenant}",
        "noscheme/{tenant}",
        "notes://{+tenant}/x",
        "notes://{tenant}/{x",
    ],
)
def test_bad_uri_templates_do_not_compile(template: str) -> None:
    with pytest.raises(ValueError, match=r"tenant|scheme|malformed"):
        compile_uri_template(template)


# --- property: whatever the payload, no foreign id survives in a tenant argument -----------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8), st.just("globex"))
_keys = st.one_of(st.sampled_from([*NAMES, "q", "items", "filter"]), st.text(max_size=6))
_payload = st.recursive(
    _scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(_keys, children, max_size=4)),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(arguments=st.dictionaries(_keys, _payload, max_size=5))
def test_no_foreign_tenant_id_ever_survives_in_a_tenant_argument(arguments: dict[str, Any]) -> None:
    params = call(arguments)
    for mode in (REJECT, REWRITE):
        decision = evaluate(mode, "acme", "tools/call", copy.deepcopy(params), SCHEMA_PATHS)
        if decision.action is Action.DENY:
            continue
        forwarded = apply(params, decision)
        assert_only_tenant(forwarded["arguments"], "acme")
        json.dumps(forwarded)  # still serialisable as sent upstream
