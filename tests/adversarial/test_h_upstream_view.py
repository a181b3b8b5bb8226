"""THREATS H: tenant values where the client's JSON does not show them but the upstream's SDK finds them.

A shared, tenant-trusting SDK notes server sits behind the proxy (each tenant's requests carry the
proxy's `X-MCP-Tenant` header, so every recorded upstream request tells whose it was). Each test
drives the real SDK client in both eras, and checks what the upstream read and what came back.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from mcp import MCPError
from mcp_types import (
    CreateMessageResult,
    ListRootsResult,
    PromptReference,
    ResourceTemplateReference,
    Root,
    TextContent,
)

from proxy.demo import client_for
from proxy.http.keys import SERVICES
from tests.conftest import TENANTS, RunningProxy, StartProxy
from tests.upstreams import Recorder

pytestmark = pytest.mark.e2e

MODES = ["auto", "legacy"]  # 2026-07-28, and the handshake era
NAMES = ["tenant_id", "tenantId", "org_id"]


def policy(on_mismatch: str = "reject", hide: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "tenant_arguments": {"names": NAMES, "on_mismatch": on_mismatch, "hide_from_schema": hide},
        "resources": {"tenant_uri_templates": ["notes://{tenant}/{path}"]},
        **extra,
    }


def text_of(result: Any) -> str:
    return " ".join(getattr(block, "text", "") for block in getattr(result, "content", []))


def upstream_calls(recorder: Recorder, method: str) -> list[tuple[str, dict[str, Any]]]:
    """(tenant header, params) of every request of `method` the shared upstream received."""
    found = []
    for record in recorder.snapshot():
        if f'"method":"{method}"' in record.text:
            found.append((record.headers.get("x-mcp-tenant", ""), json.loads(record.text)["params"]))
    return found


ShareProxy = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
def share(make_proxy: StartProxy, shared_upstream: Any) -> ShareProxy:
    """A proxy in front of the shared upstream for both tenants, each with the given policy."""

    async def start(tenant_policy: dict[str, Any]) -> RunningProxy:
        return await make_proxy(
            dict.fromkeys(TENANTS, shared_upstream.url),
            policies=dict.fromkeys(TENANTS, tenant_policy),
            tenants={
                t: {"upstream": {"url": shared_upstream.url, "tenant_header": "X-MCP-Tenant"}, "policy": t}
                for t in TENANTS
            },
        )

    return start


async def seed_globex(running: RunningProxy, secret: str) -> None:
    async with client_for(running.url, running.token("globex"), "legacy") as client:
        await client.call_tool("add_note", {"text": secret})


# --- 1. JSON inside a string ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hide", [True, False], ids=["hidden", "visible"])
async def test_a_json_string_naming_another_tenant_is_refused(
    share: ShareProxy, shared_upstream: Any, mode: str, hide: bool
) -> None:
    running = await share(policy("reject", hide))
    secret = f"globex-merger-{mode}-{hide}"
    await seed_globex(running, secret)
    shared_upstream.recorder.clear()
    async with client_for(running.url, running.token("acme"), mode) as client:
        for smuggled in (
            json.dumps({"tenant_id": "globex", "text": ""}),
            "  " + json.dumps({"text": "", "tenant_id": "globex"}, indent=2),  # any spacing the SDK accepts
            json.dumps({"tenant_id": "acme", "text": ""}).replace('"acme"', '"acme","tenant_id":"globex"'),
        ):
            with pytest.raises(MCPError) as refused:
                await client.call_tool("search_notes", {"query": smuggled})
            assert refused.value.error.code == -32005
            assert "query<json>.tenant_id" in refused.value.error.message
            assert "globex" not in refused.value.error.message
    assert upstream_calls(shared_upstream.recorder, "tools/call") == []  # nothing reached the upstream


@pytest.mark.parametrize("mode", MODES)
async def test_rewrite_mode_rewrites_inside_the_json_string_and_keeps_it_a_string(
    share: ShareProxy, shared_upstream: Any, mode: str
) -> None:
    running = await share(policy("rewrite"))
    secret = f"globex-rewrite-{mode}"
    await seed_globex(running, secret)
    shared_upstream.recorder.clear()
    async with client_for(running.url, running.token("acme"), mode) as client:
        answer = await client.call_tool("search_notes", {"query": json.dumps({"tenant_id": "globex"})})
    assert secret not in text_of(answer)
    assert json.loads(text_of(answer))["tenant_id"] == "acme"
    ((header, params),) = upstream_calls(shared_upstream.recorder, "tools/call")
    assert header == "acme"
    query = params["arguments"]["query"]
    assert isinstance(query, str)
    assert json.loads(query) == {"tenant_id": "acme"}
    running.app[SERVICES].reports.run_now()
    metrics = running.app[SERVICES].metrics.render().decode()
    assert 'mcp_proxy_spoof_attempts_total{rule="tenant_arguments",tenant="acme"} 1.0' in metrics


def encoded(document: Any, times: int) -> str:
    text = json.dumps(document)
    for _ in range(times - 1):
        text = json.dumps(text)
    return text


@pytest.mark.parametrize("mode", MODES)
async def test_a_document_json_encoded_twice_is_looked_into_again(
    share: ShareProxy, shared_upstream: Any, mode: str
) -> None:
    """A string whose JSON value is a string holding the document: upstreams that decode until they
    hold no string read the tenant inside. Refused in reject mode; beyond the nesting bound, refused
    whatever it names."""
    running = await share(policy("reject"))
    async with client_for(running.url, running.token("acme"), mode) as client:
        for smuggled in (
            encoded({"tenant_id": "globex"}, 2),
            "  " + encoded({"q": 1, "tenant_id": "globex"}, 3),
            encoded({"tenant_id": "acme"}, 4),  # past the bound: refused even naming the caller
        ):
            with pytest.raises(MCPError) as refused:
                await client.call_tool("read_document", {"doc": smuggled})
            assert refused.value.error.code == -32005
            assert "doc<json><json>" in refused.value.error.message
        own = await client.call_tool("read_document", {"doc": encoded({"tenant_id": "acme"}, 2)})
    assert json.loads(text_of(own))["tenant_id"] == "acme"
    assert [p["arguments"]["doc"] for _, p in upstream_calls(shared_upstream.recorder, "tools/call")] == [
        encoded({"tenant_id": "acme"}, 2)
    ]


@pytest.mark.parametrize("mode", MODES)
async def test_rewrite_mode_rewrites_a_twice_encoded_document_and_encodes_it_back_twice(
    share: ShareProxy, shared_upstream: Any, mode: str
) -> None:
    running = await share(policy("rewrite"))
    async with client_for(running.url, running.token("acme"), mode) as client:
        answer = await client.call_tool("read_document", {"doc": encoded({"tenant_id": "globex", "n": 1}, 2)})
    assert json.loads(text_of(answer))["tenant_id"] == "acme"
    ((header, params),) = upstream_calls(shared_upstream.recorder, "tools/call")
    sent = params["arguments"]["doc"]
    assert header == "acme"
    assert isinstance(json.loads(sent), str)  # still a string holding a string holding the document
    assert json.loads(json.loads(sent)) == {"tenant_id": "acme", "n": 1}


@pytest.mark.parametrize("mode", MODES)
async def test_a_nested_model_behind_a_ref_is_hidden_and_filled(
    share: ShareProxy, shared_upstream: Any, mode: str
) -> None:
    running = await share(policy("reject", hide=True))
    async with client_for(running.url, running.token("acme"), mode) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        schema = tools["search_notes"].input_schema
        assert "tenant_id" not in json.dumps(schema)  # nor in $defs
        await client.call_tool("add_note", {"text": f"acme-own-{mode}"})
        found = json.loads(text_of(await client.call_tool("search_notes", {"query": {"text": "own"}})))
        as_string = await client.call_tool("search_notes", {"query": json.dumps({"text": "own"})})
    assert found["tenant_id"] == "acme"
    assert f"acme-own-{mode}" in found["notes"]
    assert json.loads(text_of(as_string))["tenant_id"] == "acme"  # filled inside the JSON string too
    for header, params in upstream_calls(shared_upstream.recorder, "tools/call"):
        query = params["arguments"].get("query")
        if query is not None:
            decoded = json.loads(query) if isinstance(query, str) else query
            assert decoded["tenant_id"] == header == "acme"


async def test_a_tool_listed_as_carrying_json_documents_keeps_its_strings(
    share: ShareProxy, shared_upstream: Any
) -> None:
    """The heuristic can be turned off for tools whose string arguments are documents; a string the
    schema says is an object is still looked into (the SDK decodes it)."""
    exempt = policy("reject")
    exempt["tenant_arguments"]["json_document_tools"] = ["add_note", "search_notes"]
    running = await share(exempt)
    document = json.dumps({"tenant_id": "globex", "body": "a document that quotes another tenant"})
    async with client_for(running.url, running.token("acme"), "legacy") as client:
        stored = json.loads(text_of(await client.call_tool("add_note", {"text": document})))
        with pytest.raises(MCPError):
            await client.call_tool("search_notes", {"query": json.dumps({"tenant_id": "globex"})})
    assert stored["tenant_id"] == "acme"


# --- 2. completion context --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "ref",
    [
        ResourceTemplateReference(type="ref/resource", uri="notes://acme/{path}"),  # the caller's own
        ResourceTemplateReference(type="ref/resource", uri="other://{x}"),
        PromptReference(type="ref/prompt", name="summarize_notes"),
    ],
    ids=["own-template", "other-scheme", "prompt"],
)
async def test_completion_context_naming_another_tenant_is_refused_whatever_the_ref(
    share: ShareProxy, shared_upstream: Any, mode: str, ref: Any
) -> None:
    running = await share(policy("reject"))
    async with client_for(running.url, running.token("acme"), mode) as client:
        for context in ({"tenant": "globex"}, {"tenant_id": "globex"}, {"filter": '{"org_id":"globex"}'}):
            with pytest.raises(MCPError) as refused:
                await client.complete(ref, {"name": "path", "value": ""}, context_arguments=context)
            assert refused.value.error.code == -32005
        own = await client.complete(ref, {"name": "path", "value": ""}, context_arguments={"tenant": "acme"})
    assert own.completion.values and own.completion.values[0].startswith("acme-path-")
    for header, params in upstream_calls(shared_upstream.recorder, "completion/complete"):
        assert header == "acme"
        assert "globex" not in json.dumps(params)


@pytest.mark.parametrize("mode", MODES)
async def test_completion_context_is_rewritten_in_rewrite_mode(
    share: ShareProxy, shared_upstream: Any, mode: str
) -> None:
    running = await share(policy("rewrite"))
    ref = ResourceTemplateReference(type="ref/resource", uri="notes://acme/{path}")
    async with client_for(running.url, running.token("acme"), mode) as client:
        completed = await client.complete(
            ref, {"name": "path", "value": ""}, context_arguments={"tenant": "globex"}
        )
    assert completed.completion.values[0].startswith("acme-path-")
    assert "globex" not in json.dumps(completed.completion.values)


# --- 3. client roots, sampling, elicitation -------------------------------------------------------


class RootsCallback:
    """A client's list_roots callback offering `directory`; `calls` counts the times it was asked."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.calls: list[str] = []

    async def __call__(self, context: Any) -> ListRootsResult:
        self.calls.append(self.directory)
        return ListRootsResult(roots=[Root(uri=self.directory, name="mine")])


@pytest.mark.parametrize("mode", MODES)
async def test_by_default_the_upstream_never_sees_the_clients_roots(
    share: ShareProxy, shared_upstream: Any, mode: str
) -> None:
    running = await share(policy())
    callback = RootsCallback("file:///srv/globex")
    async with client_for(running.url, running.token("acme"), mode, list_roots_callback=callback) as client:
        try:
            answer = text_of(await client.call_tool("show_roots", {}))
        except MCPError as refused:  # the SDK refuses a tool whose resolver needs a missing capability
            answer = refused.error.message
    assert "/srv/globex" not in answer
    assert callback.calls == []
    for record in shared_upstream.recorder.snapshot():
        assert "/srv/globex" not in record.text
        assert '"roots"' not in record.text or '"roots":[]' in record.text


@pytest.mark.parametrize("mode", MODES)
async def test_a_roots_list_policy_answers_with_the_callers_own_roots(
    share: ShareProxy, shared_upstream: Any, mode: str
) -> None:
    running = await share(policy(client_capabilities={"roots": ["file:///srv/{tenant}"]}))
    callback = RootsCallback("file:///srv/globex")
    async with client_for(running.url, running.token("acme"), mode, list_roots_callback=callback) as client:
        answer = json.loads(text_of(await client.call_tool("show_roots", {})))
    assert answer["roots"] == ["file:///srv/acme"]
    assert callback.calls == []


@pytest.mark.parametrize("mode", MODES)
async def test_roots_allowed_reach_the_upstream_as_the_client_gave_them(share: ShareProxy, mode: str) -> None:
    """The control: with `roots: allow` the client's roots (here another tenant's directory) are what
    the upstream adopts, which is the attack the default prevents."""
    running = await share(policy(client_capabilities={"roots": "allow"}))
    callback = RootsCallback("file:///srv/globex")
    async with client_for(running.url, running.token("acme"), mode, list_roots_callback=callback) as client:
        answer = json.loads(text_of(await client.call_tool("show_roots", {})))
    assert answer["roots"] == ["file:///srv/globex"]


@pytest.mark.parametrize("mode", MODES)
async def test_denied_sampling_never_reaches_the_client(share: ShareProxy, mode: str) -> None:
    running = await share(policy(client_capabilities={"sampling": "deny"}))
    asked: list[Any] = []

    async def sample(context: Any, params: Any) -> CreateMessageResult:
        asked.append(params)
        return CreateMessageResult(
            role="assistant", content=TextContent(type="text", text="sampled"), model="m"
        )

    async with client_for(running.url, running.token("acme"), mode, sampling_callback=sample) as client:
        try:
            answer = text_of(await client.call_tool("ask_model", {"topic": "globex"}))
        except MCPError as refused:
            answer = refused.error.message
    assert asked == []
    assert "sampled" not in answer


# --- found by the black-box attack pass ------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_an_elicitation_answer_naming_another_tenant_never_reaches_the_upstream(
    share: ShareProxy, shared_upstream: Any, mode: str
) -> None:
    running = await share(policy("reject"))
    answered: list[Any] = []

    async def elicit(context: Any, params: Any) -> Any:
        from mcp_types import ElicitResult

        answered.append(params)
        return ElicitResult(action="accept", content={"org_id": "globex"})

    async with client_for(running.url, running.token("acme"), mode, elicitation_callback=elicit) as client:
        try:
            answer = text_of(await client.call_tool("ask_org", {"topic": "merger"}))
        except MCPError as refused:
            answer = refused.error.message
    assert answered  # the client was asked, and answered with another tenant
    assert '"org_id": "globex"' not in answer and '"org_id":"globex"' not in answer
    for record in shared_upstream.recorder.snapshot():
        assert "globex" not in record.text  # neither inputResponses nor the answer POST carried it


async def test_meta_naming_another_tenant_is_refused_and_null_arguments_are_filled(
    share: ShareProxy, shared_upstream: Any
) -> None:
    running = await share(policy("reject"))
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "tenant_id": "globex",
    }
    headers = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": "list_notes"}
    body: dict[str, Any] = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "list_notes", "_meta": meta},
    }
    status, _, raw = await running.post(body, token=running.token("acme"), headers=headers)
    assert status == 200  # a policy refusal is a JSON-RPC answer (2026-07-28: -32005 maps to 200)
    assert json.loads(raw)["error"]["code"] == -32005
    del meta["tenant_id"]
    body["params"]["arguments"] = None
    status, _, raw = await running.post(body, token=running.token("acme"), headers=headers)
    assert status == 200, raw
    assert json.loads(raw)["result"]["structuredContent"]["tenant_id"] == "acme"
    assert all("globex" not in r.text for r in shared_upstream.recorder.snapshot())


@pytest.mark.parametrize("mode", MODES)
async def test_a_notification_naming_another_tenants_resource_never_reaches_the_client(
    share: ShareProxy, mode: str
) -> None:
    running = await share(policy("reject"))
    seen: list[str] = []

    async def on_message(message: Any) -> None:
        seen.append(repr(message))

    async def on_log(params: Any) -> None:
        seen.append(str(params.data))

    async with client_for(
        running.url, running.token("acme"), mode, message_handler=on_message, logging_callback=on_log,
        log_level="debug",
    ) as client:  # fmt: skip
        await client.call_tool("broadcast_update", {"uri": "notes://acme/own-plan"})
        await client.call_tool("broadcast_update", {"uri": "notes://globex/merger-plan-with-initech"})
        await client.call_tool("whoami", {})  # anything still on its way has arrived by now
    assert not [line for line in seen if "globex" in line]
    if mode == "legacy":  # (the handshake era has the session channel the updates travel on)
        assert [line for line in seen if "notes://acme/own-plan" in line]  # the caller's own pass
