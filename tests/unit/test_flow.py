"""The flow without sockets: the POST flow of http/endpoint.py run on a mocked request against a
MockUpstream, and the stage machinery of flow.py on its own."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from aiohttp import StreamReader, web
from aiohttp.test_utils import make_mocked_request

from proxy.config import ProxyConfig
from proxy.flow import (
    Around,
    Exchange,
    Hooks,
    ServerKind,
    ServerMessage,
    Stage,
    deliver,
    enter_stages,
    hook,
    leave_stages,
)
from proxy.http.endpoint import POST, serve
from proxy.protocol.errors import PolicyDenied
from proxy.runtime import Runtime, Services
from proxy.upstreams.base import MockResponse, MockUpstream, UpstreamRequest
from tests.factories import config_dict, make_config, make_request, token, with_upstreams

META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}
TOOLS = {
    "tools": [
        {
            "name": "list_notes",
            "inputSchema": {"type": "object", "properties": {"tenant_id": {"type": "string"}}},
        }
    ]
}


def proxy_with(
    tmp_path: Path, policy: dict[str, Any] | None = None
) -> tuple[Runtime, Services, MockUpstream]:
    data = config_dict({"acme": "http://127.0.0.1:9/mcp", "globex": "http://127.0.0.1:9/mcp"})
    if policy is not None:
        (tmp_path / "policies").mkdir(exist_ok=True)
        (tmp_path / "policies" / "p.yaml").write_text(yaml.safe_dump(policy))
        data["policies_dir"] = str(tmp_path / "policies")
        for tenant in data["tenants"].values():
            tenant["policy"] = "p"
    config = ProxyConfig.model_validate(data)
    runtime, services = Runtime.build(config), Services.build(config)
    upstream = MockUpstream(results={"tools/list": TOOLS, "tools/call": {"content": [], "isError": False}})
    runtime.tenants.explicit["acme"].upstream = upstream
    runtime.tenants.explicit["acme"].catalog._upstream = upstream
    return runtime, services, upstream


def post(runtime: Runtime, services: Services, body: dict[str, Any], tenant: str = "acme") -> Exchange:
    raw = json.dumps(body).encode()
    payload = StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
    payload.feed_data(raw)
    payload.feed_eof()
    headers = {
        "Authorization": f"Bearer {token(tenant=tenant, sub='alice')}",
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "Content-Length": str(len(raw)),
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": body["method"],
    }
    name = body.get("params", {}).get("name")
    if name is not None:
        headers["Mcp-Name"] = name
    request = make_mocked_request("POST", "/mcp", headers=headers, payload=payload)
    return Exchange(request=request, runtime=runtime, services=services)


def call_body(arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "list_notes", "arguments": arguments, "_meta": META},
    }


async def test_a_tools_call_goes_through_every_stage_to_the_upstream(tmp_path: Path) -> None:
    runtime, services, upstream = proxy_with(tmp_path, {"tenant_arguments": {"hide_from_schema": True}})
    exchange = post(runtime, services, call_body({}))
    reply = await serve(exchange, POST)
    assert isinstance(reply, web.Response) and reply.status == 200 and isinstance(reply.body, bytes)
    assert json.loads(reply.body)["result"] == {"content": [], "isError": False}
    sent = [b for b in upstream.bodies() if b.get("method") == "tools/call"]
    assert sent[0]["params"]["arguments"] == {"tenant_id": "acme"}  # filled in by the policy
    forwarded = next(r for r in upstream.requests if r.body and b"tools/call" in r.body)
    assert forwarded.headers["Mcp-Method"] == "tools/call" and forwarded.headers["Mcp-Name"] == "list_notes"
    assert "Authorization" not in forwarded.headers  # the client's token never goes upstream
    assert (exchange.ctx is not None and exchange.ctx.tenant, exchange.outcome) == ("acme", "ok")
    assert services.limiter.of("acme", runtime.tenants.explicit["acme"].limits).in_flight == 0  # given back


async def test_a_spoofed_tenant_argument_is_refused_before_the_upstream(tmp_path: Path) -> None:
    runtime, services, upstream = proxy_with(tmp_path, {"tenant_arguments": {"names": ["tenant_id"]}})
    exchange = post(runtime, services, call_body({"tenant_id": "globex"}))
    reply = await serve(exchange, POST)
    assert isinstance(reply, web.Response) and reply.status == 200  # an MCP error, not a transport failure
    assert isinstance(reply.body, bytes) and json.loads(reply.body)["error"]["code"] == PolicyDenied.code
    assert not [b for b in upstream.bodies() if b.get("method") == "tools/call"]
    assert exchange.outcome == "spoof"


async def test_an_upstream_failure_is_the_upstreams_fault_and_releases_everything(tmp_path: Path) -> None:
    runtime, services, _ = proxy_with(tmp_path)

    def failing(request: UpstreamRequest) -> MockResponse:
        return MockResponse(502, body="bad gateway")

    with_upstreams(runtime, {"acme": MockUpstream(failing)})
    exchange = post(runtime, services, call_body({}))
    reply = await serve(exchange, POST)
    assert isinstance(reply, web.Response) and reply.status == 502
    assert exchange.upstream_fault is True
    limits = services.limiter.of("acme", runtime.tenants.explicit["acme"].limits)
    assert limits.in_flight == 0 and limits.breaker.failures == 1


class Recording(Around[Exchange]):
    def __init__(self, name: str, log: list[str], takes: bool = True) -> None:
        self.name, self.log, self.takes = name, log, takes

    async def enter(self, call: Exchange) -> bool:
        self.log.append(f"enter {self.name}")
        return self.takes

    def leave(self, call: Exchange, failure: BaseException | None) -> None:
        self.log.append(f"leave {self.name} {type(failure).__name__ if failure else 'ok'}")


async def test_around_stages_leave_in_reverse_whatever_ended_the_flow() -> None:
    log: list[str] = []
    exchange = make_request(make_config())

    async def refuse(call: Exchange) -> None:
        log.append("refuse")
        raise PolicyDenied()

    entered: list[Any] = []
    stages: list[Stage[Exchange]] = [
        Recording("a", log),
        Recording("b", log, takes=False),
        Recording("c", log),
        refuse,
    ]
    with pytest.raises(PolicyDenied) as raised:
        await enter_stages(exchange, stages, entered)
    assert leave_stages(entered, raised.value) is raised.value
    assert log == ["enter a", "enter b", "enter c", "refuse", "leave c PolicyDenied", "leave a PolicyDenied"]


async def test_an_early_answer_stops_the_stages() -> None:
    exchange = make_request(make_config())
    seen: list[str] = []

    async def answer(call: Exchange) -> None:
        call.reply = web.Response(text="local")

    async def never(call: Exchange) -> None:
        seen.append("never")

    reply = await enter_stages(exchange, [answer, never], [])
    assert isinstance(reply, web.Response) and reply.text == "local" and seen == []


def test_hooks_see_only_the_messages_they_are_about() -> None:
    seen: list[str] = []

    def about_lists(call: Any, message: ServerMessage) -> ServerMessage:
        seen.append("lists")
        return message

    def dropping(call: Any, message: ServerMessage) -> None:
        seen.append("drop")

    hooks = Hooks(
        [
            hook(about_lists, ServerKind.ANSWER, methods=["tools/list"]),
            hook(dropping, ServerKind.NOTIFICATION),
        ]
    )
    exchange = make_request(make_config())
    listed = ServerMessage(
        ServerKind.ANSWER, {"jsonrpc": "2.0", "id": 1, "result": {"tools": []}}, exchange.message
    )
    assert deliver(exchange, listed, hooks) is not None and seen == ["lists"]
    called = make_request(
        make_config(), body={"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {}}
    )
    answer = ServerMessage(ServerKind.ANSWER, {"jsonrpc": "2.0", "id": 2, "result": {}}, called.message)
    assert deliver(called, answer, hooks) is not None and seen == ["lists"]  # not about tools/call
    note = ServerMessage(ServerKind.NOTIFICATION, {"jsonrpc": "2.0", "method": "notifications/message"})
    assert deliver(exchange, note, hooks) is None and seen == ["lists", "drop"]
