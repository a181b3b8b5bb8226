"""Extensions the proxy does not enforce are offered to neither side (layers/containment/extensions.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from proxy.flow import Request, ServerKind, ServerMessage
from proxy.layers.containment import capabilities, extensions
from proxy.layers.data_access.policy import PolicyFile, compile_policy
from proxy.types import Era
from tests.factories import make_config, make_request

TASKS, UI, OTHER = "io.modelcontextprotocol/tasks", "io.modelcontextprotocol/ui", "com.example/other"
DECLARED = {TASKS: {}, UI: {"mimeTypes": ["text/html"]}, OTHER: {}}


def with_policy(request: Request, allow: list[str]) -> Request:
    policy = compile_policy("p", PolicyFile.model_validate({"extensions": {"allow": allow}}))
    request.tenant = dataclasses.replace(request.tenant, policy=policy)
    return request


@pytest.mark.parametrize(("allow", "offered"), [(None, {TASKS}), ([UI], {TASKS, UI})])
@pytest.mark.parametrize("method", ["initialize", "server/discover"])
def test_the_client_is_offered_only_the_enforced_extensions_and_the_allowed_ones(
    method: str, allow: list[str] | None, offered: set[str]
) -> None:
    request = make_request(make_config(), body={"jsonrpc": "2.0", "id": 1, "method": method, "params": {}})
    if allow is not None:
        with_policy(request, allow)
    result = {"capabilities": {"tools": {}, "extensions": dict(DECLARED)}}
    answer = ServerMessage(ServerKind.ANSWER, {"jsonrpc": "2.0", "id": 1, "result": result}, request.message)
    shown = extensions.offer(request, answer)
    assert shown is not None
    assert set(shown.body["result"]["capabilities"]["extensions"]) == offered
    assert shown.body["result"]["capabilities"]["tools"] == {}


async def test_the_upstream_learns_only_of_the_clients_enforced_and_allowed_extensions() -> None:
    config = make_config()
    params: dict[str, Any] = {"protocolVersion": "2025-11-25", "capabilities": {"extensions": dict(DECLARED)}}
    handshake = make_request(
        config, body={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params}
    )
    handshake.era = Era.HANDSHAKE
    await capabilities.restrict(handshake)
    assert set(handshake.message.params["capabilities"]["extensions"]) == {TASKS}
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {"extensions": dict(DECLARED)},
    }
    modern = make_request(
        config, body={"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": meta}}
    )
    with_policy(modern, [UI])
    await capabilities.restrict(modern)
    declared = modern.message.params["_meta"]["io.modelcontextprotocol/clientCapabilities"]["extensions"]
    assert set(declared) == {TASKS, UI}
