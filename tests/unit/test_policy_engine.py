"""evaluate() and the result filters, from tables (THREATS.md section B and E)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.layers.data_access.engine import (
    UNCHANGED,
    Action,
    Decision,
    evaluate,
    filter_result,
    foreign_uri,
)
from proxy.layers.data_access.policy import PolicyFile, compile_policy, compile_uri_template
from proxy.layers.data_access.schemas import SchemaIndex, hide_tenant_properties

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
SCHEMA_PATHS: dict[str, Any] = {"type": "object", "properties": {"tenant_id": {"type": "string"}}}
NO_SCHEMA = None


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
    from proxy.layers.data_access.engine import apply_rewrites

    result = copy.deepcopy(params)
    apply_rewrites(result, decision.rewrites)
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
        (call({"text": "hi"}), NO_SCHEMA, Action.FORWARD),
        (call({"tenant_id": "acme", "deep": [{"org_id": "acme"}]}), SCHEMA_PATHS, Action.FORWARD),
        (call({"text": "hi"}), SCHEMA_PATHS, Action.REWRITE),  # declared and absent: filled in
        ({"name": "list_notes"}, SCHEMA_PATHS, Action.REWRITE),  # no arguments object at all
        (call({"tenant": "globex"}), NO_SCHEMA, Action.FORWARD),  # not a configured name
    ],
)
def test_own_tenant_passes_and_declared_absent_is_filled(params: Any, declared: Any, action: Action) -> None:
    decision = evaluate(REJECT, "acme", "tools/call", params, declared)
    assert decision.action is action
    assert not decision.spoof
    if action is Action.REWRITE:
        assert apply(params, decision)["arguments"]["tenant_id"] == "acme"


def test_nested_declared_argument_is_filled_only_where_its_object_exists() -> None:
    declared = {
        "type": "object",
        "properties": {"scope": {"type": "object", "properties": {"tenant_id": {"type": "string"}}}},
    }
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
    refused = evaluate(REJECT, "acme", "completion/complete", params).answer
    assert refused is not None and refused["completion"]["values"] == []


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
    assert decision.answer is not None and decision.answer["completion"]["values"] == ["acme"]


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
    index = SchemaIndex(schema)
    assert index.declared([schema], names) == ["tenant_id"]
    assert index.declared(index.property([schema], "scope"), names) == ["org_id"]
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


# --- what the upstream reads: JSON in strings, $ref, completion context (THREATS H) ---------------

QUERY_SCHEMA: dict[str, Any] = {  # what Pydantic writes for search_notes(query: NoteQuery)
    "$defs": {
        "NoteQuery": {
            "type": "object",
            "properties": {"tenant_id": {"type": "string"}, "text": {"type": "string", "default": ""}},
            "required": ["tenant_id"],
        }
    },
    "type": "object",
    "properties": {"query": {"$ref": "#/$defs/NoteQuery"}},
    "required": ["query"],
}
OPTIONAL_QUERY_SCHEMA: dict[str, Any] = {
    **QUERY_SCHEMA,
    "properties": {"query": {"anyOf": [{"$ref": "#/$defs/NoteQuery"}, {"type": "null"}], "default": None}},
}


@pytest.mark.parametrize(
    ("arguments", "schema", "where"),
    [
        ({"query": '{"tenant_id": "globex"}'}, QUERY_SCHEMA, "query<json>.tenant_id"),
        ({"query": '{"tenant_id": "globex"}'}, None, "query<json>.tenant_id"),  # no schema: sniffed
        ({"query": '{"tenant_id": "globex"}'}, OPTIONAL_QUERY_SCHEMA, "query<json>.tenant_id"),
        ({"query": ' \n[{"org_id": "globex"}]'}, None, "query<json>[0].org_id"),
        ({"q": '{"a": "{\\"tenantId\\": \\"globex\\"}"}'}, None, "q<json>.a<json>.tenantId"),
        ({"query": '{"tenant_id": "acme", "tenant_id": "globex"}'}, QUERY_SCHEMA, "query<json>.tenant_id"),
        ({"query": '{"tenant_id": "globex", "tenant_id": "acme"}'}, QUERY_SCHEMA, "query<json>.tenant_id"),
        ({"list": ['{"tenant_id": "globex"}']}, None, "list[0]<json>.tenant_id"),
    ],
    ids=[
        "schema-object",
        "sniffed",
        "optional-model",
        "array",
        "json-in-json",
        "dup-last",
        "dup-first",
        "item",
    ],
)
def test_a_tenant_argument_inside_a_json_string_is_a_spoof(arguments: Any, schema: Any, where: str) -> None:
    decision = evaluate(REJECT, "acme", "tools/call", call(arguments, "search_notes"), schema)
    assert (decision.action, decision.rule, decision.argument, decision.spoof) == (
        Action.DENY, "tenant_arguments", where, True,
    )  # fmt: skip
    params = call(copy.deepcopy(arguments), "search_notes")
    rewritten = evaluate(REWRITE, "acme", "tools/call", params, schema)
    assert rewritten.action is Action.REWRITE and rewritten.spoof
    forwarded = apply(params, rewritten)["arguments"]
    assert "globex" not in json.dumps(forwarded)
    assert isinstance(next(iter(forwarded.values())), type(next(iter(arguments.values()))))  # same form


def test_json_nested_in_strings_beyond_the_bound_is_refused() -> None:
    inner: Any = {"x": 1}
    for _ in range(5):
        inner = {"wrapped": json.dumps(inner)}
    decision = evaluate(REWRITE, "acme", "tools/call", call(inner))
    assert decision.action is Action.DENY
    assert "nested too deeply" in decision.reason


@pytest.mark.parametrize(
    ("arguments", "schema"),
    [
        ({"query": '{"tenant_id": "acme", "text": "x"}'}, QUERY_SCHEMA),  # own tenant: unchanged
        ({"note": '{"owner": "globex"}'}, None),  # no configured name inside
        ({"note": "{not json"}, None),
        ({"note": "[1, 2, 3]"}, None),
        ({"n": "42"}, {"type": "object", "properties": {"n": {"type": "integer"}}}),
    ],
)
def test_json_strings_without_a_foreign_tenant_pass_unchanged(arguments: Any, schema: Any) -> None:
    assert evaluate(REJECT, "acme", "tools/call", call(arguments), schema).action is Action.FORWARD


def test_tools_carrying_json_documents_are_not_sniffed_but_still_decoded_where_the_schema_says() -> None:
    exempt = policy(tenant_arguments={"names": list(NAMES), "json_document_tools": ["store_*"]})
    document = {"body": '{"tenant_id": "globex"}'}
    assert evaluate(exempt, "acme", "tools/call", call(document, "store_doc")).action is Action.FORWARD
    assert evaluate(exempt, "acme", "tools/call", call(document, "search")).action is Action.DENY
    smuggled = {"query": '{"tenant_id": "globex"}'}
    assert (
        evaluate(exempt, "acme", "tools/call", call(smuggled, "store_q"), QUERY_SCHEMA).action is Action.DENY
    )


def test_fills_follow_refs_into_present_objects_and_json_strings() -> None:
    params = call({"query": {"text": "x"}}, "search_notes")
    decision = evaluate(REJECT, "acme", "tools/call", params, QUERY_SCHEMA)
    assert decision.action is Action.REWRITE and not decision.spoof
    assert apply(params, decision)["arguments"]["query"] == {"text": "x", "tenant_id": "acme"}
    as_string = call({"query": '{"text": "x"}'}, "search_notes")
    decision = evaluate(REJECT, "acme", "tools/call", as_string, QUERY_SCHEMA)
    assert json.loads(apply(as_string, decision)["arguments"]["query"]) == {"text": "x", "tenant_id": "acme"}
    optional = call({"query": {"text": "x"}}, "search_notes")
    decision = evaluate(REJECT, "acme", "tools/call", optional, OPTIONAL_QUERY_SCHEMA)
    assert apply(optional, decision)["arguments"]["query"]["tenant_id"] == "acme"
    absent = call({}, "search_notes")  # no query object: nothing to fill it into
    assert evaluate(REJECT, "acme", "tools/call", absent, QUERY_SCHEMA).action is Action.FORWARD


def test_hiding_reaches_defs_and_composition() -> None:
    hidden = hide_tenant_properties(QUERY_SCHEMA, frozenset(NAMES))
    assert "tenant_id" not in json.dumps(hidden)
    assert hidden["$defs"]["NoteQuery"]["properties"] == {"text": {"type": "string", "default": ""}}
    assert hidden["$defs"]["NoteQuery"]["required"] == []
    composed = {"allOf": [{"properties": {"org_id": {}}, "required": ["org_id"]}], "default": {"org_id": 1}}
    out = hide_tenant_properties(composed, frozenset(NAMES))
    assert out["allOf"][0] == {"properties": {}, "required": []}
    assert out["default"] == {"org_id": 1}  # data, not a schema


def test_schema_references_are_local_bounded_and_cycle_safe() -> None:
    cyclic = {"$defs": {"A": {"$ref": "#/$defs/B"}, "B": {"$ref": "#/$defs/A"}}, "$ref": "#/$defs/A"}
    assert SchemaIndex(cyclic).takes_string([cyclic]) in (True, False)  # terminates
    remote = {"properties": {"q": {"$ref": "https://evil.example/schema.json"}}}
    index = SchemaIndex(remote)
    assert index.property([remote], "q") == [{"$ref": "https://evil.example/schema.json"}]
    recursive = {"$defs": {"N": {"type": "object", "properties": {"child": {"$ref": "#/$defs/N"},
                 "tenant_id": {"type": "string"}}}}, "$ref": "#/$defs/N"}  # fmt: skip
    deep: Any = {"child": {"child": {"child": {}}}}
    params = call(deep)
    decision = evaluate(REJECT, "acme", "tools/call", params, recursive)
    filled = apply(params, decision)["arguments"]
    assert filled["child"]["child"]["child"]["tenant_id"] == "acme"


@pytest.mark.parametrize(
    "ref",
    [
        {"type": "ref/resource", "uri": "notes://acme/{path}"},
        {"type": "ref/resource", "uri": "other://{x}"},
        {"type": "ref/prompt", "name": "anything"},
    ],
)
def test_completion_context_is_checked_whatever_the_ref(ref: Any) -> None:
    for context in ({"tenant": "globex"}, {"tenant_id": "globex"}, {"f": '{"org_id": "globex"}'}):
        params = {"ref": ref, "argument": {"name": "path", "value": ""}, "context": {"arguments": context}}
        assert evaluate(REJECT, "acme", "completion/complete", params).action is Action.DENY
        rewritten = evaluate(REWRITE, "acme", "completion/complete", params)
        assert "globex" not in json.dumps(apply(params, rewritten))
    smuggled = {"ref": ref, "argument": {"name": "q", "value": '{"tenant_id": "globex"}'}}
    assert evaluate(REJECT, "acme", "completion/complete", smuggled).action is Action.DENY
    named = {"ref": ref, "argument": {"name": "tenant", "value": "g"}}
    assert evaluate(REJECT, "acme", "completion/complete", named).action is Action.ANSWER


def test_client_capabilities_as_the_upstream_sees_them() -> None:
    from proxy.layers.data_access.policy import ClientCapabilitiesSpec, compile_client_capabilities

    sent = {"roots": {"listChanged": True}, "sampling": {}, "elicitation": {"form": {}}, "experimental": {}}
    default = compile_client_capabilities(ClientCapabilitiesSpec())
    assert default.filter(sent) == {"sampling": {}, "elicitation": {"form": {}}, "experimental": {}}
    listed = compile_client_capabilities(
        ClientCapabilitiesSpec(roots=("file:///srv/{tenant}",), sampling="deny", elicitation="deny")
    )
    assert listed.filter(sent) == {"roots": {}, "experimental": {}}
    assert listed.filter({}) == {"roots": {}}
    assert listed.roots_for("acme") == [{"uri": "file:///srv/acme"}]
    assert not listed.allows("sampling/createMessage") and not listed.allows("roots/list")
    allowed = compile_client_capabilities(ClientCapabilitiesSpec(roots="allow"))
    assert allowed.filter(sent) == sent and allowed.allows("roots/list")


# --- found by the black-box attack pass (tenant-argument layer) -----------------------------------


@pytest.mark.parametrize("depth", [300, 5000])
def test_a_json_string_too_deep_for_the_proxy_to_read_is_refused(depth: int) -> None:
    document = '{"tenant_id":"globex","pad":' + "[" * depth + "]" * depth + "}"
    for mode in (REJECT, REWRITE):
        decision = evaluate(
            mode, "acme", "tools/call", call({"query": document}, "search_notes"), QUERY_SCHEMA
        )
        assert decision.action is Action.DENY
        assert (decision.argument or "").startswith("query")
        assert "nested too deeply" in decision.reason


def test_json_documents_in_strings_are_bounded_together_not_only_one_by_one() -> None:
    """Each document within the bound, but 100 of them: 1.4 million nodes to decode and walk for a
    4 MB request. Refused once the request's documents hold more than the bound between them,
    before the rest is decoded; a few such documents still pass."""
    document = "[" + ",".join(["[]"] * 9_000) + "]"
    many = {f"d{number}": document for number in range(100)}
    decision = evaluate(REJECT, "acme", "tools/call", call(many))
    assert decision.action is Action.DENY
    assert decision.argument == "d2"  # the third document crossed the bound
    assert "holds too much JSON inside strings" in decision.reason
    assert evaluate(REJECT, "acme", "tools/call", call({"d0": document, "d1": document})) is UNCHANGED
    foreign = evaluate(REJECT, "acme", "tools/call", call({"d0": document, "d1": '{"tenant_id":"globex"}'}))
    assert foreign.action is Action.DENY and foreign.spoof


def test_a_document_python_cannot_parse_but_javascript_can_is_still_checked() -> None:
    document = '{"tenant_id": "globex", "n": ' + "9" * 5000 + "}"  # past Python's int digit limit
    decision = evaluate(REWRITE, "acme", "tools/call", call({"q": document}))
    assert decision.action is Action.DENY  # cannot be rewritten faithfully: refused even in rewrite mode
    assert decision.spoof


def test_meta_and_input_responses_are_client_data_the_upstream_reads() -> None:
    params = {"name": "list_notes", "arguments": {}, "_meta": {"tenant_id": "globex"}}
    assert evaluate(REJECT, "acme", "tools/call", params).argument == "_meta.tenant_id"
    assert evaluate(REJECT, "acme", "tools/list", {"_meta": {"org_id": "globex"}}).action is Action.DENY
    rewritten = evaluate(REWRITE, "acme", "tools/call", copy.deepcopy(params))
    assert apply(params, rewritten)["_meta"]["tenant_id"] == "acme"
    retry = {
        "name": "book",
        "arguments": {},
        "inputResponses": {"who": {"action": "accept", "content": {"org_id": "globex"}}},
    }
    assert evaluate(REJECT, "acme", "tools/call", retry).action is Action.DENY
    both = {"name": "list_notes", "arguments": {"tenant_id": "globex"}, "_meta": {"tenantId": "initech"}}
    decision = evaluate(REWRITE, "acme", "tools/call", copy.deepcopy(both))
    assert "globex" not in json.dumps(apply(both, decision)) and "initech" not in json.dumps(
        apply(both, decision)
    )


def test_a_clients_answer_naming_another_tenant_is_a_spoof() -> None:
    from proxy.layers.data_access.engine import evaluate_answer

    elicited = {"jsonrpc": "2.0", "id": 3, "result": {"action": "accept", "content": {"org_id": "globex"}}}
    decision = evaluate_answer(REJECT, "acme", elicited)
    assert (decision.action, decision.argument, decision.spoof) == (
        Action.DENY,
        "result.content.org_id",
        True,
    )
    sampled = {
        "jsonrpc": "2.0",
        "id": 4,
        "result": {"content": {"type": "text", "text": '{"tenant_id": "globex"}'}},
    }
    assert evaluate_answer(REJECT, "acme", sampled).action is Action.DENY
    own = {"jsonrpc": "2.0", "id": 5, "result": {"action": "accept", "content": {"org_id": "acme"}}}
    assert evaluate_answer(REJECT, "acme", own).action is Action.FORWARD


def test_null_arguments_are_filled_like_absent_ones() -> None:
    params: dict[str, Any] = {"name": "list_notes", "arguments": None}
    decision = evaluate(REJECT, "acme", "tools/call", params, SCHEMA_PATHS)
    assert apply(params, decision)["arguments"] == {"tenant_id": "acme"}


def test_a_document_encoded_twice_is_looked_into_wherever_strings_are() -> None:
    """A string whose JSON value is a string holding a document (F11): arguments, completion values
    and context, MRTR inputResponses and answers to server-to-client requests alike."""
    from proxy.layers.data_access.engine import evaluate_answer

    twice = json.dumps(json.dumps({"tenant_id": "globex"}))
    ref = {"type": "ref/prompt", "name": "anything"}
    requests: list[tuple[str, dict[str, Any]]] = [
        ("tools/call", {"name": "read_document", "arguments": {"doc": twice}}),
        ("prompts/get", {"name": "p", "arguments": {"doc": twice}}),
        ("completion/complete", {"ref": ref, "argument": {"name": "q", "value": twice}}),
        (
            "completion/complete",
            {"ref": ref, "argument": {"name": "q"}, "context": {"arguments": {"d": twice}}},
        ),
        ("tools/call", {"name": "b", "inputResponses": {"who": {"content": {"doc": twice}}}}),
    ]
    for method, params in requests:
        refused = evaluate(REJECT, "acme", method, params)
        assert (refused.action, refused.spoof) == (Action.DENY, True), (method, params)
        assert refused.argument is not None and "<json><json>.tenant_id" in refused.argument
        rewritten = apply(params, evaluate(REWRITE, "acme", method, copy.deepcopy(params)))
        assert "globex" not in json.dumps(rewritten) and "acme" in json.dumps(rewritten)
    answer = {"jsonrpc": "2.0", "id": 3, "result": {"content": {"type": "text", "text": twice}}}
    assert evaluate_answer(REJECT, "acme", answer).action is Action.DENY
    own = json.dumps(json.dumps({"tenant_id": "acme"}))
    assert evaluate(REJECT, "acme", "tools/call", {"name": "t", "arguments": {"doc": own}}) == UNCHANGED
    plain = {"name": "t", "arguments": {"doc": json.dumps("just text"), "n": '"{not json"'}}
    assert evaluate(REJECT, "acme", "tools/call", plain) == UNCHANGED


def test_rewriting_a_document_encoded_twice_encodes_it_back_twice() -> None:
    params = {"name": "t", "arguments": {"doc": json.dumps(json.dumps({"tenant_id": "globex", "n": [1]}))}}
    sent = apply(params, evaluate(REWRITE, "acme", "tools/call", copy.deepcopy(params)))["arguments"]["doc"]
    assert json.loads(json.loads(sent)) == {"tenant_id": "acme", "n": [1]}
    nested = json.dumps(json.dumps(json.dumps(json.dumps({"tenant_id": "acme"}))))  # past the bound
    too_deep = evaluate(REJECT, "acme", "tools/call", {"name": "t", "arguments": {"doc": nested}})
    assert too_deep.action is Action.DENY
