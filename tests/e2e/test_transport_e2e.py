"""The MCP endpoint's request rules, end to end: raw HTTP in front, real SDK upstreams behind.

Every refusal pins the exact client-visible answer (HTTP status, JSON-RPC code, what the message
names) and that the refused request never reached an upstream (the upstreams' recorders).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from proxy.demo import client_for
from tests.conftest import MCP_ACCEPT, TENANTS, RunningProxy
from tests.upstreams import Recorded, free_port

pytestmark = pytest.mark.e2e

MODERN = "2026-07-28"
HANDSHAKE = "2025-11-25"
META = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "raw-test", "version": "0"},
}


# --- helpers shared by the e2e transport files ---------------------------------------------------


def modern_body(method: str, params: dict[str, Any] | None = None, request_id: int = 1) -> dict[str, Any]:
    """A modern-era request whose params carry the full _meta envelope."""
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": {**(params or {}), "_meta": META}}


def modern_headers(method: str, name: str | None = None, **extra: str) -> dict[str, str]:
    headers = {"MCP-Protocol-Version": MODERN, "Mcp-Method": method, **extra}
    if name is not None:
        headers["Mcp-Name"] = name
    return headers


def call_body(tool: str, arguments: dict[str, Any], request_id: int = 1) -> dict[str, Any]:
    return modern_body("tools/call", {"name": tool, "arguments": arguments}, request_id)


def error_of(body: bytes) -> dict[str, Any]:
    answer = json.loads(body)
    assert set(answer) == {"jsonrpc", "id", "error"}, answer
    return dict(answer["error"])


def posted(upstream: Any) -> list[dict[str, Any]]:
    """The JSON-RPC messages an upstream received in POST bodies, in order."""
    return [json.loads(r.text) for r in upstream.recorder.snapshot() if r.method == "POST"]


def posted_methods(upstream: Any) -> list[str]:
    return [m.get("method", "<response>") for m in posted(upstream)]


def requests_with(upstream: Any, method: str) -> list[Recorded]:
    return [
        r
        for r in upstream.recorder.snapshot()
        if r.method == "POST" and json.loads(r.text).get("method") == method
    ]


def nothing_reached(upstreams: dict[str, Any]) -> bool:
    return all(not upstreams[t].recorder.snapshot() for t in TENANTS)


def text_of(result: Any) -> str:
    return " ".join(getattr(block, "text", "") for block in getattr(result, "content", []))


async def sse_messages(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON messages of an SSE response, each as soon as its event is complete."""
    data: list[str] = []
    async for raw_line in response.content:
        line = raw_line.decode("utf-8").rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            if any(data):  # (a priming event has empty data: no message)
                yield json.loads("\n".join(data))
            data = []


async def initialize(proxy: RunningProxy, token: str, capabilities: dict[str, Any] | None = None) -> str:
    """A raw handshake-era initialize plus notifications/initialized; returns the proxy's session id."""
    status, headers, _ = await proxy.post(
        {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": HANDSHAKE,
                "capabilities": capabilities or {},
                "clientInfo": {"name": "raw-test", "version": "0"},
            },
        },
        token=token,
    )
    assert status == 200
    session_id = headers["Mcp-Session-Id"]
    status, _, _ = await proxy.post(
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        token=token,
        headers=session_headers(session_id),
    )
    assert status == 202
    return session_id


def session_headers(session_id: str) -> dict[str, str]:
    return {"Mcp-Session-Id": session_id, "MCP-Protocol-Version": HANDSHAKE}


@contextlib.asynccontextmanager
async def proxy_variant(
    base: RunningProxy,
    *,
    listen: dict[str, Any] | None = None,
    upstreams: dict[str, dict[str, Any]] | None = None,
    sessions: dict[str, Any] | None = None,
) -> AsyncIterator[RunningProxy]:
    """Another proxy on a free port, configured like `base` but for the listen and upstream changes."""
    from proxy.config import ProxyConfig
    from proxy.http.server import start_server

    port = free_port()
    url = f"http://127.0.0.1:{port}{base.config.listen.path}"
    data = base.config.model_dump()
    data["listen"].update({"port": port, "public_url": url, **(listen or {})})
    for issuer in data["auth"]["issuers"]:
        issuer["audiences"] = [url]
    for tenant, changes in (upstreams or {}).items():
        data["tenants"][tenant]["upstream"].update(changes)
    data["sessions"].update(sessions or {})
    config = ProxyConfig.model_validate(data, context={})
    runner, _ = await start_server(config)
    try:
        yield RunningProxy(url, config, runner.app)
    finally:
        await runner.cleanup()


# --- A. modern-era request rules -----------------------------------------------------------------


async def test_a_well_formed_modern_call_is_answered_by_the_callers_upstream(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    status, _, body = await proxy.post(
        call_body("whoami", {}), token=proxy.token("acme"), headers=modern_headers("tools/call", "whoami")
    )
    assert status == 200
    answer = json.loads(body)
    assert answer["id"] == 1
    assert upstreams["acme"].canary in json.dumps(answer["result"])
    (call,) = requests_with(upstreams["acme"], "tools/call")
    assert call.headers["mcp-protocol-version"] == MODERN
    assert call.headers["mcp-method"] == "tools/call"
    assert call.headers["mcp-name"] == "whoami"
    assert not upstreams["globex"].recorder.snapshot()


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        ({"Mcp-Method": "tools/call", "Mcp-Name": "whoami"}, "MCP-Protocol-Version"),
        (modern_headers("tools/list", "whoami"), "Mcp-Method"),
        ({"MCP-Protocol-Version": MODERN, "Mcp-Name": "whoami"}, "Mcp-Method"),
        (modern_headers("tools/call", "list_notes"), "Mcp-Name"),
        (modern_headers("tools/call"), "Mcp-Name"),
        (modern_headers("tools/call", "WHOAMI"), "Mcp-Name"),
        (modern_headers("tools/call", "=?base64?!!not-base64!!?="), "Mcp-Name"),
    ],
    ids=[
        "version-missing",
        "method-differs",
        "method-missing",
        "name-differs",
        "name-missing",
        "name-case-differs",
        "name-bad-sentinel",
    ],
)
async def test_headers_that_disagree_with_the_body_are_refused_before_any_upstream(
    proxy: RunningProxy, upstreams: dict[str, Any], headers: dict[str, str], fragment: str
) -> None:
    status, _, body = await proxy.post(call_body("whoami", {}), token=proxy.token("acme"), headers=headers)
    assert status == 400
    error = error_of(body)
    assert error["code"] == -32020
    assert fragment in error["message"]
    assert json.loads(body)["id"] == 1
    assert nothing_reached(upstreams)


async def test_a_version_header_differing_from_meta_is_a_mismatch_even_when_both_are_supported(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    body = call_body("whoami", {})
    body["params"]["_meta"] = {**META, "io.modelcontextprotocol/protocolVersion": "2099-01-01"}
    status, _, answer = await proxy.post(
        body, token=proxy.token("acme"), headers=modern_headers("tools/call", "whoami")
    )
    assert status == 400
    assert error_of(answer)["code"] == -32020
    assert nothing_reached(upstreams)


async def test_an_unknown_version_header_disagreeing_with_meta_is_a_header_mismatch(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    status, _, answer = await proxy.post(
        call_body("whoami", {}),
        token=proxy.token("acme"),
        headers=modern_headers("tools/call", "whoami", **{"MCP-Protocol-Version": "2099-01-01"}),
    )
    assert status == 400
    assert nothing_reached(upstreams)
    assert error_of(answer)["code"] == -32020


async def test_resources_read_mcp_name_must_equal_the_uri(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    body = modern_body("resources/read", {"uri": "notes://acme/plan"})
    status, _, answer = await proxy.post(
        body, token=proxy.token("acme"), headers=modern_headers("resources/read", "notes://acme/other")
    )
    assert status == 400
    assert error_of(answer)["code"] == -32020
    assert "Mcp-Name" in error_of(answer)["message"]
    assert nothing_reached(upstreams)
    status, _, answer = await proxy.post(
        body, token=proxy.token("acme"), headers=modern_headers("resources/read", "notes://acme/plan")
    )
    assert status == 200
    assert upstreams["acme"].canary in json.loads(answer)["result"]["contents"][0]["text"]


async def test_a_base64_sentinel_mcp_name_that_decodes_to_the_uri_is_accepted(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    uri = "notes://acme/café-ünïcode"
    encoded = "=?base64?" + base64.b64encode(uri.encode()).decode() + "?="
    status, _, answer = await proxy.post(
        modern_body("resources/read", {"uri": uri}),
        token=proxy.token("acme"),
        headers=modern_headers("resources/read", encoded),
    )
    assert status == 200
    text = json.loads(answer)["result"]["contents"][0]["text"]
    assert "café-ünïcode" in text
    assert upstreams["acme"].canary in text
    (read,) = requests_with(upstreams["acme"], "resources/read")
    assert read.headers["mcp-name"] == encoded
    # The same sentinel naming a different URI is a mismatch.
    other = "=?base64?" + base64.b64encode(b"notes://acme/other").decode() + "?="
    upstreams["acme"].recorder.clear()
    status, _, answer = await proxy.post(
        modern_body("resources/read", {"uri": uri}),
        token=proxy.token("acme"),
        headers=modern_headers("resources/read", other),
    )
    assert (status, error_of(answer)["code"]) == (400, -32020)
    assert nothing_reached(upstreams)


@pytest.mark.parametrize(
    "meta",
    [
        None,
        {"io.modelcontextprotocol/clientCapabilities": {}},
        {"io.modelcontextprotocol/protocolVersion": MODERN},
        "not-an-object",
    ],
    ids=["no-meta", "no-version", "no-capabilities", "meta-not-object"],
)
async def test_missing_meta_keys_are_invalid_params(
    proxy: RunningProxy, upstreams: dict[str, Any], meta: Any
) -> None:
    body = call_body("whoami", {})
    if meta is None:
        del body["params"]["_meta"]
    else:
        body["params"]["_meta"] = meta
    status, _, answer = await proxy.post(
        body, token=proxy.token("acme"), headers=modern_headers("tools/call", "whoami")
    )
    assert status == 400
    error = error_of(answer)
    assert error["code"] == -32602
    assert "_meta" in error["message"]
    assert nothing_reached(upstreams)


async def test_an_unsupported_version_is_refused_with_the_supported_list(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    body = call_body("whoami", {})
    body["params"]["_meta"] = {**META, "io.modelcontextprotocol/protocolVersion": "2099-01-01"}
    status, _, answer = await proxy.post(
        body,
        token=proxy.token("acme"),
        headers=modern_headers("tools/call", "whoami", **{"MCP-Protocol-Version": "2099-01-01"}),
    )
    assert status == 400
    error = error_of(answer)
    assert error["code"] == -32022
    assert MODERN in error["data"]["supported"]
    assert "2099-01-01" not in error["data"]["supported"]
    assert nothing_reached(upstreams)


async def test_an_unknown_method_is_404_method_not_found(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    status, _, answer = await proxy.post(
        modern_body("tools/explode"), token=proxy.token("acme"), headers=modern_headers("tools/explode")
    )
    assert status == 404
    error = error_of(answer)
    assert error["code"] == -32601
    assert "tools/explode" in error["message"]
    assert nothing_reached(upstreams)


async def test_handshake_methods_are_unknown_in_the_modern_era(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    status, _, answer = await proxy.post(
        modern_body("ping"), token=proxy.token("acme"), headers=modern_headers("ping")
    )
    assert (status, error_of(answer)["code"]) == (404, -32601)
    assert nothing_reached(upstreams)


@pytest.mark.parametrize("http_method", ["GET", "DELETE"])
async def test_get_and_delete_without_a_session_are_405(
    proxy: RunningProxy, upstreams: dict[str, Any], http_method: str
) -> None:
    headers = {
        "Authorization": f"Bearer {proxy.token('acme')}",
        "Accept": "text/event-stream",
        "MCP-Protocol-Version": MODERN,
    }
    async with aiohttp.ClientSession() as http, http.request(http_method, proxy.url, headers=headers) as r:
        assert r.status == 405
        assert "POST" in r.headers["Allow"]
        assert error_of(await r.read())["code"] == -32600
    assert nothing_reached(upstreams)


@pytest.mark.parametrize("http_method", ["PUT", "PATCH"])
async def test_other_http_methods_are_405(
    proxy: RunningProxy, upstreams: dict[str, Any], http_method: str
) -> None:
    headers = {"Authorization": f"Bearer {proxy.token('acme')}", "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as http,
        http.request(http_method, proxy.url, data=b"{}", headers=headers) as response,
    ):
        assert response.status == 405
        assert set(response.headers["Allow"].replace(" ", "").split(",")) == {"GET", "POST", "DELETE"}
    assert nothing_reached(upstreams)


@pytest.mark.parametrize("header", ["Mcp-Method", "Mcp-Name", "MCP-Protocol-Version"])
async def test_a_duplicated_routing_header_is_refused(
    proxy: RunningProxy, upstreams: dict[str, Any], header: str
) -> None:
    sent = modern_headers("tools/call", "whoami")
    raw_headers = [(k, v) for k, v in sent.items()] + [(header, sent[header])]
    raw_headers += [
        ("Authorization", f"Bearer {proxy.token('acme')}"),
        ("Accept", MCP_ACCEPT),
        ("Content-Type", "application/json"),
    ]
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            proxy.url,
            data=json.dumps(call_body("whoami", {})).encode(),
            headers=CIMultiDict(raw_headers),
        ) as response,
    ):
        assert response.status == 400
        error = error_of(await response.read())
    assert error["code"] == -32600  # the SDK server answers -32020 here; both are 400s
    assert "more than once" in error["message"]
    assert nothing_reached(upstreams)


async def test_a_notification_in_the_modern_era_gets_202(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    status, _, body = await proxy.post(
        {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 7}},
        token=proxy.token("acme"),
        headers=modern_headers("notifications/cancelled"),
    )
    assert (status, body) == (202, b"")


async def test_a_client_response_in_the_modern_era_is_refused(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    status, _, body = await proxy.post(
        {"jsonrpc": "2.0", "id": 5, "result": {}},
        token=proxy.token("acme"),
        headers={"MCP-Protocol-Version": MODERN},
    )
    assert status == 400
    assert "server-to-client" in error_of(body)["message"]
    assert nothing_reached(upstreams)


# --- A. Mcp-Param-* (x-mcp-header) --------------------------------------------------------------


def region_call(region: Any = "emea", **headers: str) -> tuple[dict[str, Any], dict[str, str]]:
    arguments = {} if region is None else {"region": region}
    return call_body("region_report", arguments), modern_headers("tools/call", "region_report", **headers)


async def learn_tools(proxy: RunningProxy, tenant: str = "acme") -> None:
    """A tools/list through the proxy, so it knows the tenant's x-mcp-header annotations."""
    status, _, _ = await proxy.post(
        modern_body("tools/list"), token=proxy.token(tenant), headers=modern_headers("tools/list")
    )
    assert status == 200


async def test_a_matching_param_header_is_forwarded_with_the_same_value(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    body, headers = region_call("emea", **{"Mcp-Param-Region": "emea"})
    status, _, answer = await proxy.post(body, token=proxy.token("acme"), headers=headers)
    assert status == 200
    result = json.loads(answer)["result"]
    assert result["structuredContent"] == {"region": "emea", "canary": upstreams["acme"].canary}
    (call,) = requests_with(upstreams["acme"], "tools/call")
    assert call.headers["mcp-param-region"] == "emea"


async def test_a_disagreeing_param_header_is_refused_and_no_call_reaches_the_upstream(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    body, headers = region_call("emea", **{"Mcp-Param-Region": "apac"})
    status, _, answer = await proxy.post(body, token=proxy.token("acme"), headers=headers)
    assert status == 400
    error = error_of(answer)
    assert error["code"] == -32020
    assert "Mcp-Param-Region" in error["message"]
    # The proxy may have fetched the catalog itself to learn the annotation; no tools/call went up.
    assert set(posted_methods(upstreams["acme"])) <= {"tools/list"}
    for listing in requests_with(upstreams["acme"], "tools/list"):
        assert "apac" not in json.dumps(listing.headers) + listing.text
    assert not upstreams["globex"].recorder.snapshot()


async def test_a_param_header_without_its_argument_is_refused(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    body, headers = region_call(None, **{"Mcp-Param-Region": "emea"})
    status, _, answer = await proxy.post(body, token=proxy.token("acme"), headers=headers)
    assert status == 400
    error = error_of(answer)
    assert error["code"] == -32020
    assert "present" in error["message"]
    assert "tools/call" not in posted_methods(upstreams["acme"])


async def test_an_argument_without_its_param_header_is_refused_once_the_tool_is_known(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    await learn_tools(proxy)
    upstreams["acme"].recorder.clear()
    body, headers = region_call("emea")
    status, _, answer = await proxy.post(body, token=proxy.token("acme"), headers=headers)
    assert status == 400
    error = error_of(answer)
    assert error["code"] == -32020
    assert "missing" in error["message"]
    assert nothing_reached(upstreams)


async def test_an_argument_without_its_param_header_on_an_unknown_tool_is_refused_by_the_upstream(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    """Before the proxy has seen the tool it has nothing to check: the upstream refuses the call."""
    body, headers = region_call("emea")
    status, _, answer = await proxy.post(body, token=proxy.token("acme"), headers=headers)
    assert status == 400
    assert error_of(answer)["code"] == -32020
    assert "Mcp-Param-Region" in error_of(answer)["message"]
    (call,) = requests_with(upstreams["acme"], "tools/call")
    assert "mcp-param-region" not in call.headers


async def test_a_duplicated_param_header_is_refused(proxy: RunningProxy, upstreams: dict[str, Any]) -> None:
    await learn_tools(proxy)
    upstreams["acme"].recorder.clear()
    raw = [
        *modern_headers("tools/call", "region_report").items(),
        ("Mcp-Param-Region", "emea"),
        ("Mcp-Param-Region", "emea"),
        ("Authorization", f"Bearer {proxy.token('acme')}"),
        ("Accept", MCP_ACCEPT),
        ("Content-Type", "application/json"),
    ]
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            proxy.url,
            data=json.dumps(region_call("emea")[0]).encode(),
            headers=CIMultiDict(raw),
        ) as response,
    ):
        assert response.status == 400
        error = error_of(await response.read())
    assert error["code"] == -32020
    assert "more than once" in error["message"]
    assert nothing_reached(upstreams)


async def test_a_non_ascii_param_value_matches_its_base64_sentinel(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    region = "Île-de-France"
    encoded = "=?base64?" + base64.b64encode(region.encode()).decode() + "?="
    body, headers = region_call(region, **{"Mcp-Param-Region": encoded})
    status, _, answer = await proxy.post(body, token=proxy.token("acme"), headers=headers)
    assert status == 200
    assert json.loads(answer)["result"]["structuredContent"]["region"] == region
    (call,) = requests_with(upstreams["acme"], "tools/call")
    assert call.headers["mcp-param-region"] == encoded


async def test_undeclared_param_headers_are_not_forwarded(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    body, headers = region_call("emea", **{"Mcp-Param-Region": "emea", "Mcp-Param-Foo": "bar"})
    status, _, _ = await proxy.post(body, token=proxy.token("acme"), headers=headers)
    assert status == 200
    status, _, _ = await proxy.post(
        call_body("whoami", {}, 2),
        token=proxy.token("acme"),
        headers=modern_headers("tools/call", "whoami", **{"Mcp-Param-Foo": "bar"}),
    )
    assert status == 200
    calls = requests_with(upstreams["acme"], "tools/call")
    assert len(calls) == 2
    for call in calls:
        assert "mcp-param-foo" not in call.headers
    assert calls[0].headers["mcp-param-region"] == "emea"
    assert "mcp-param-region" not in calls[1].headers


async def test_the_sdk_client_calls_a_tool_with_a_mirrored_param_through_the_proxy(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    async with client_for(proxy.url, proxy.token("acme"), "auto") as client:
        await client.list_tools()
        result = await client.call_tool("region_report", {"region": "emea"})
    assert not result.is_error
    assert json.loads(text_of(result)) == {"region": "emea", "canary": upstreams["acme"].canary}
    (call,) = requests_with(upstreams["acme"], "tools/call")
    assert call.headers["mcp-param-region"] == "emea"
    assert call.headers["mcp-protocol-version"] == MODERN


async def test_the_sdk_client_recovers_when_it_calls_before_listing(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    """Unaware of the annotation, the client omits the header; the mismatch makes it relist and retry."""
    async with client_for(proxy.url, proxy.token("acme"), "auto") as client:
        result = await client.call_tool("region_report", {"region": "apac"})
    assert not result.is_error
    assert json.loads(text_of(result))["region"] == "apac"
    calls = requests_with(upstreams["acme"], "tools/call")
    assert calls[-1].headers["mcp-param-region"] == "apac"
    assert all(c.headers.get("mcp-param-region") in (None, "apac") for c in calls)


# --- B. bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "code", "fragment"),
    [
        (b'{"jsonrpc": "2.0", "id": 1, "method": ', -32700, "Parse error"),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list", "x": "\xff\xfe"}', -32700, "UTF-8"),
        (b'{"jsonrpc": "2.0", "id": 1, "id": 2, "method": "tools/list"}', -32700, "duplicate key"),
        (b'{"jsonrpc": "2.0", "id": NaN, "method": "tools/list"}', -32700, "NaN"),
        (b'[{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}]', -32600, "batch"),
        (b"[]", -32600, "batch"),
        (b'"tools/list"', -32600, "JSON-RPC object"),
        (b"42", -32600, "JSON-RPC object"),
        (b'{"jsonrpc": "1.0", "id": 1, "method": "tools/list"}', -32600, "2.0"),
        (b'{"id": 1, "method": "tools/list"}', -32600, "2.0"),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": [1]}', -32602, "params"),
        (b'{"jsonrpc": "2.0", "id": true, "method": "tools/list"}', -32600, "id"),
        (b'{"jsonrpc": "2.0", "id": 1, "method": ""}', -32600, "method"),
        (b"", -32700, "Parse error"),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"x": 1e400}}', -32700, "range"),
    ],
    ids=[
        "truncated",
        "invalid-utf8",
        "duplicate-keys",
        "nan",
        "batch",
        "empty-batch",
        "string",
        "number",
        "jsonrpc-1.0",
        "jsonrpc-missing",
        "params-array",
        "id-bool",
        "method-empty",
        "empty-body",
        "float-overflow",
    ],
)
async def test_bad_bodies_get_a_clear_json_rpc_error(
    proxy: RunningProxy, upstreams: dict[str, Any], raw: bytes, code: int, fragment: str
) -> None:
    status, headers, body = await proxy.post(
        None, raw=raw, token=proxy.token("acme"), headers=modern_headers("tools/list")
    )
    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    error = error_of(body)
    assert error["code"] == code
    assert fragment.lower() in error["message"].lower()
    assert nothing_reached(upstreams)


async def test_deeply_nested_json_is_a_parse_error(proxy: RunningProxy, upstreams: dict[str, Any]) -> None:
    depth = 100_000
    raw = (
        b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"x": ' + b"[" * depth + b"]" * depth
    )
    status, _, body = await proxy.post(
        None, raw=raw + b"}}", token=proxy.token("acme"), headers=modern_headers("tools/list")
    )
    assert status == 400
    assert error_of(body)["code"] == -32700
    assert nothing_reached(upstreams)


async def test_an_integer_too_long_to_convert_is_a_parse_error(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    raw = b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"x": ' + b"7" * 5000 + b"}}"
    status, _, body = await proxy.post(
        None, raw=raw, token=proxy.token("acme"), headers=modern_headers("tools/list")
    )
    assert nothing_reached(upstreams)
    assert (status, error_of(body)["code"]) == (400, -32700)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_a_body_that_is_not_json_by_content_type_is_415(
    proxy: RunningProxy, upstreams: dict[str, Any], content_type: str | None
) -> None:
    headers = {
        "Authorization": f"Bearer {proxy.token('acme')}",
        "Accept": MCP_ACCEPT,
        **modern_headers("tools/list"),
    }
    if content_type is not None:
        headers["Content-Type"] = content_type
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            proxy.url,
            data=json.dumps(modern_body("tools/list")).encode(),
            headers=headers,
            skip_auto_headers=["Content-Type"],
        ) as response,
    ):
        assert response.status == 415
        assert error_of(await response.read())["code"] == -32600
    assert nothing_reached(upstreams)


async def test_content_type_with_a_charset_parameter_is_accepted(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    status, _, body = await proxy.post(
        modern_body("tools/list"),
        token=proxy.token("acme"),
        headers={**modern_headers("tools/list"), "Content-Type": "application/json; charset=utf-8"},
    )
    assert status == 200
    assert "tools" in json.loads(body)["result"]


@pytest.fixture
async def small_proxy(proxy: RunningProxy) -> AsyncIterator[RunningProxy]:
    """A proxy whose request bodies are limited to 2048 bytes."""
    async with proxy_variant(proxy, listen={"max_body_bytes": 2048}) as variant:
        yield variant


def _big_call() -> bytes:
    return json.dumps(call_body("add_note", {"tenant_id": "acme", "text": "x" * 1_000_000})).encode()


async def _post_big(proxy: RunningProxy, data: Any) -> tuple[int, bytes]:
    headers = {
        "Authorization": f"Bearer {proxy.token('acme')}",
        "Accept": MCP_ACCEPT,
        "Content-Type": "application/json",
        **modern_headers("tools/call", "add_note"),
    }
    async with aiohttp.ClientSession() as http, http.post(proxy.url, data=data, headers=headers) as response:
        return response.status, await response.read()


async def test_a_body_over_the_limit_is_413_with_content_length(
    small_proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    status, body = await _post_big(small_proxy, _big_call())
    assert status == 413
    error = error_of(body)
    assert error["code"] == -32600
    assert "2048" in error["message"]
    assert nothing_reached(upstreams)


async def test_a_chunked_body_over_the_limit_is_413(
    small_proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    payload = _big_call()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 1024):
            yield payload[start : start + 1024]

    status, body = await _post_big(small_proxy, chunks())
    assert status == 413
    assert "2048" in error_of(body)["message"]
    assert nothing_reached(upstreams)


async def test_a_body_under_the_limit_still_works_on_the_small_proxy(
    small_proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    status, _, body = await small_proxy.post(
        call_body("whoami", {}),
        token=small_proxy.token("acme"),
        headers=modern_headers("tools/call", "whoami"),
    )
    assert status == 200
    assert upstreams["acme"].canary in body.decode()


@pytest.mark.parametrize(
    "origin", ["https://evil.example", "http://localhost.evil.example", "null", "http://127.0.0.2:80"]
)
async def test_a_foreign_origin_is_403(proxy: RunningProxy, upstreams: dict[str, Any], origin: str) -> None:
    status, _, body = await proxy.post(
        modern_body("tools/list"),
        token=proxy.token("acme"),
        headers={**modern_headers("tools/list"), "Origin": origin},
    )
    assert status == 403
    error = error_of(body)
    assert error["code"] == -32003
    assert "Origin" in error["message"]
    assert nothing_reached(upstreams)


async def test_a_foreign_origin_is_403_even_without_a_token(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    status, _, _ = await proxy.post(
        modern_body("tools/list"), headers={**modern_headers("tools/list"), "Origin": "https://evil.example"}
    )
    assert status == 403
    assert nothing_reached(upstreams)


@pytest.mark.parametrize("origin", ["http://localhost:1234", "http://127.0.0.1:5173", None])
async def test_loopback_origins_are_allowed_on_a_loopback_listener(
    proxy: RunningProxy, upstreams: dict[str, Any], origin: str | None
) -> None:
    extra = {"Origin": origin} if origin is not None else {}
    status, _, body = await proxy.post(
        modern_body("tools/list"),
        token=proxy.token("acme"),
        headers={**modern_headers("tools/list"), **extra},
    )
    assert status == 200
    assert "region_report" in body.decode()
    assert requests_with(upstreams["acme"], "tools/list")


# --- E. the handshake-era GET stream -------------------------------------------------------------


def _get_headers(proxy: RunningProxy, session_id: str, **extra: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {proxy.token('acme')}",
        "Accept": "text/event-stream",
        **session_headers(session_id),
        **extra,
    }


def _upstream_gets(upstream: Any) -> list[Recorded]:
    return [r for r in upstream.recorder.snapshot() if r.method == "GET"]


async def test_get_opens_the_sessions_stream_and_a_second_concurrent_get_is_409(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    session_id = await initialize(proxy, proxy.token("acme"))
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.url, headers=_get_headers(proxy, session_id)) as first:
            assert first.status == 200
            assert first.headers["Content-Type"].startswith("text/event-stream")
            async with http.get(proxy.url, headers=_get_headers(proxy, session_id)) as second:
                assert second.status == 409
                assert error_of(await second.read())["code"] == -32600
            assert len(_upstream_gets(upstreams["acme"])) == 1
        # Once the first stream is closed, the session may open a new one.
        for _ in range(100):
            async with http.get(proxy.url, headers=_get_headers(proxy, session_id)) as again:
                if again.status == 200:
                    break
                assert again.status == 409
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the closed GET stream was never released")
    upstream_gets = _upstream_gets(upstreams["acme"])
    assert len(upstream_gets) == 2
    assert all(r.headers["mcp-session-id"] != session_id for r in upstream_gets)


async def test_get_without_accepting_event_streams_is_406(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    session_id = await initialize(proxy, proxy.token("acme"))
    before = len(upstreams["acme"].recorder.snapshot())
    headers = _get_headers(proxy, session_id, Accept="application/json")
    async with aiohttp.ClientSession() as http, http.get(proxy.url, headers=headers) as response:
        assert response.status == 406
    assert len(upstreams["acme"].recorder.snapshot()) == before


async def test_get_with_a_handshake_version_but_no_session_is_400(
    proxy: RunningProxy, upstreams: dict[str, Any]
) -> None:
    headers = {
        "Authorization": f"Bearer {proxy.token('acme')}",
        "Accept": "text/event-stream",
        "MCP-Protocol-Version": HANDSHAKE,
    }
    async with aiohttp.ClientSession() as http, http.get(proxy.url, headers=headers) as response:
        assert response.status == 400
        assert "Mcp-Session-Id" in error_of(await response.read())["message"]
    assert nothing_reached(upstreams)


@pytest.mark.parametrize("last_event_id", ["1", "0", "999999", "../../1", "x" * 200])
async def test_a_last_event_id_this_session_never_issued_replays_nothing(
    proxy: RunningProxy, upstreams: dict[str, Any], last_event_id: str
) -> None:
    session_id = await initialize(proxy, proxy.token("acme"))
    headers = _get_headers(proxy, session_id, **{"Last-Event-ID": last_event_id})
    async with aiohttp.ClientSession() as http, http.get(proxy.url, headers=headers) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
    (upstream_get,) = _upstream_gets(upstreams["acme"])
    assert "last-event-id" not in upstream_get.headers
