"""Two tenants, two real SDK upstreams, the real SDK client through the proxy in both eras."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.demo import client_for
from tests.conftest import MCP_ACCEPT, TENANTS, RunningProxy

pytestmark = pytest.mark.e2e


def text_of(result: Any) -> str:
    return " ".join(getattr(block, "text", "") for block in getattr(result, "content", []))


def other(tenant: str) -> str:
    return next(t for t in TENANTS if t != tenant)


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_each_tenant_reaches_only_its_own_upstream(
    proxy: RunningProxy, upstreams: dict[str, Any], mode: str
) -> None:
    for tenant in TENANTS:
        own, foreign = upstreams[tenant].canary, upstreams[other(tenant)].canary
        async with client_for(proxy.url, proxy.token(tenant), mode) as client:
            tools = {tool.name for tool in (await client.list_tools()).tools}
            assert {"add_note", "list_notes", "whoami"} <= tools
            who = json.loads(text_of(await client.call_tool("whoami", {})))
            assert who["server_tenant"] == tenant
            assert who["canary"] == own
            await client.call_tool("add_note", {"tenant_id": tenant, "text": f"{tenant} secret plan"})
            notes = text_of(await client.call_tool("list_notes", {"tenant_id": tenant}))
            assert f"{tenant} secret plan" in notes
            assert own in notes
            resource = await client.read_resource(f"notes://{tenant}/plan")
            assert own in resource.contents[0].text
            prompt = await client.get_prompt("summarize_notes", {"tenant_id": tenant})
            prompt_text = prompt.messages[0].content.text
            assert own in prompt_text
            for answer in (notes, resource.contents[0].text, prompt_text):
                assert foreign not in answer
    for tenant in TENANTS:
        seen = " ".join(r.text for r in upstreams[tenant].recorder.snapshot())
        assert other(tenant) + " secret plan" not in seen


@pytest.mark.parametrize(("mode", "era_marker"), [("auto", "2026-07-28"), ("legacy", "initialize")])
async def test_both_eras_reach_the_upstream_in_their_own_protocol(
    proxy: RunningProxy, upstreams: dict[str, Any], mode: str, era_marker: str
) -> None:
    async with client_for(proxy.url, proxy.token("acme"), mode) as client:
        await client.call_tool("whoami", {})
    records = upstreams["acme"].recorder.snapshot()
    if mode == "auto":
        assert all(r.headers.get("mcp-protocol-version") == "2026-07-28" for r in records)
        assert not any("mcp-session-id" in r.headers for r in records)
    else:
        assert any('"method":"initialize"' in r.text for r in records)
        assert any("mcp-session-id" in r.headers for r in records[1:])


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_upstream_never_receives_the_client_token(
    proxy: RunningProxy, upstreams: dict[str, Any], mode: str
) -> None:
    client_token = proxy.token("acme")
    async with client_for(proxy.url, client_token, mode) as client:
        answer = json.loads(text_of(await client.call_tool("request_headers", {})))
    assert answer["headers"]["authorization"] == "Bearer upstream-secret-acme"
    records = upstreams["acme"].recorder.snapshot()
    assert records
    for record in records:
        assert client_token not in json.dumps(record.headers)
        assert client_token not in record.text
        assert record.headers["authorization"] == "Bearer upstream-secret-acme"
    assert not upstreams["globex"].recorder.snapshot()


async def _initialize(proxy: RunningProxy, token: str) -> str:
    status, headers, _ = await proxy.post(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "1"},
            },
        },
        token=token,
    )
    assert status == 200
    return headers["Mcp-Session-Id"]


def _session_headers(session_id: str) -> dict[str, str]:
    return {"Mcp-Session-Id": session_id, "MCP-Protocol-Version": "2025-11-25"}


LIST_TOOLS = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}


async def test_session_id_of_another_tenant_or_user_is_404_as_if_unknown(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    session_id = await _initialize(proxy, proxy.token("acme", "alice"))
    status, _, _ = await proxy.post(
        LIST_TOOLS, token=proxy.token("acme", "alice"), headers=_session_headers(session_id)
    )
    assert status == 200
    before = len(upstreams["acme"].recorder.snapshot()) + len(upstreams["globex"].recorder.snapshot())
    unknown = await proxy.post(
        LIST_TOOLS, token=proxy.token("acme", "alice"), headers=_session_headers("x" * 32)
    )
    for thief in (proxy.token("globex", "alice"), proxy.token("acme", "mallory")):
        status, _, body = await proxy.post(LIST_TOOLS, token=thief, headers=_session_headers(session_id))
        assert (status, body) == (unknown[0], unknown[2])
        assert status == 404
        assert json.loads(body)["error"]["code"] == -32004
    after = len(upstreams["acme"].recorder.snapshot()) + len(upstreams["globex"].recorder.snapshot())
    assert after == before


async def test_get_and_delete_with_a_foreign_session_are_404(proxy: RunningProxy) -> None:
    import aiohttp

    session_id = await _initialize(proxy, proxy.token("acme"))
    thief = {"Authorization": f"Bearer {proxy.token('globex')}", **_session_headers(session_id)}
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.url, headers={**thief, "Accept": "text/event-stream"}) as response:
            assert response.status == 404
        async with http.delete(proxy.url, headers=thief) as response:
            assert response.status == 404
    # The owner's session survived both attempts.
    status, _, _ = await proxy.post(
        LIST_TOOLS, token=proxy.token("acme"), headers=_session_headers(session_id)
    )
    assert status == 200


async def test_the_proxy_session_id_is_not_the_upstream_one(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    session_id = await _initialize(proxy, proxy.token("acme"))
    await proxy.post(LIST_TOOLS, token=proxy.token("acme"), headers=_session_headers(session_id))
    upstream_ids = {r.headers.get("mcp-session-id") for r in upstreams["acme"].recorder.snapshot()} - {None}
    assert upstream_ids
    assert session_id not in upstream_ids
    assert len(session_id) >= 32


async def test_a_client_chosen_session_id_is_never_adopted(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    status, _, _ = await proxy.post(
        body, token=proxy.token("acme"), headers={"Mcp-Session-Id": "chosen-by-client"}
    )
    assert status == 404
    assert not upstreams["acme"].recorder.snapshot()


async def test_delete_ends_the_session_on_both_sides(proxy: RunningProxy, upstreams: dict[str, Any]) -> None:
    import aiohttp

    session_id = await _initialize(proxy, proxy.token("acme"))
    headers = {"Authorization": f"Bearer {proxy.token('acme')}", **_session_headers(session_id)}
    async with aiohttp.ClientSession() as http, http.delete(proxy.url, headers=headers) as response:
        assert response.status == 200
    assert any(r.method == "DELETE" for r in upstreams["acme"].recorder.snapshot())
    status, _, _ = await proxy.post(
        LIST_TOOLS, token=proxy.token("acme"), headers=_session_headers(session_id)
    )
    assert status == 404


async def test_notifications_get_202(proxy: RunningProxy) -> None:
    session_id = await _initialize(proxy, proxy.token("acme"))
    status, _, body = await proxy.post(
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        token=proxy.token("acme"),
        headers=_session_headers(session_id),
    )
    assert (status, body) == (202, b"")


async def test_accept_header_is_required(proxy: RunningProxy) -> None:
    status, _, body = await proxy.post(LIST_TOOLS, token=proxy.token("acme"), headers={"Accept": "text/html"})
    assert status == 406
    assert "Accept" in json.loads(body)["error"]["message"]
    assert MCP_ACCEPT
