"""Era bridging with two replicas sharing Redis: what the README promises about replicas.

A session the proxy keeps for a handshake client is in the shared record, so the other replica
serves it; upstream sessions held for 2026-07-28 callers are each replica's own (never shared by two
callers), and a call waiting for its client's input waits on one replica only.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.e2e.test_bridging_e2e import bodies, handshake_only, upstream
from tests.e2e.test_bridging_reverse_e2e import calls, stateless, stateless_server
from tests.e2e.test_scaleout_e2e import (
    HANDSHAKE,
    MODERN,
    StartReplicas,
    call,
    initialize,
    modern_call,
    post,
    redis_server,
    start_replicas,
    tool_json,
)

pytestmark = pytest.mark.e2e
__all__ = ["handshake_only", "redis_server", "start_replicas", "stateless", "stateless_server", "upstream"]


async def test_a_session_kept_by_the_proxy_continues_on_the_other_replica_for_its_owner_only(
    start_replicas: StartReplicas, stateless: Any
) -> None:
    replicas = await start_replicas({"acme": stateless})
    alice, bob = replicas.token("acme", "alice"), replicas.token("acme", "bob")
    session = await initialize(replicas.a.url, alice, {"sampling": {}})
    answer = await post(replicas.b.url, call("whoami"), alice, session, HANDSHAKE)
    assert answer.status == 200
    assert tool_json(answer)["canary"] == stateless.canary
    ((headers, message),) = calls(stateless)
    assert headers["mcp-protocol-version"] == MODERN  # bridged by the replica that never saw initialize
    assert message["params"]["_meta"]["io.modelcontextprotocol/clientCapabilities"] == {"sampling": {}}
    assert (await post(replicas.b.url, call("whoami"), bob, session, HANDSHAKE)).status == 404


async def test_each_replica_holds_its_own_upstream_sessions_and_a_waiting_call_waits_on_one(
    start_replicas: StartReplicas, upstream: Any
) -> None:
    replicas = await start_replicas({"acme": upstream})
    alice, bob = replicas.token("acme", "alice"), replicas.token("acme", "bob")
    for replica, caller in ((replicas.a, alice), (replicas.b, alice), (replicas.b, bob)):
        assert tool_json(await post(replica.url, modern_call("whoami"), caller, version=MODERN))["canary"]
    sessions = [session for session, _ in bodies(upstream, "tools/call")]
    assert len(set(sessions)) == 3  # alice on each replica, and bob: no session shared
    ask = modern_call("ask_user", {"topic": "cellar"})
    ask["params"]["_meta"] = {
        **ask["params"]["_meta"],
        "io.modelcontextprotocol/clientCapabilities": {"elicitation": {}},
    }
    waiting = (await post(replicas.a.url, ask, alice, version=MODERN)).message["result"]
    (key,) = waiting["inputRequests"]
    retry = json.loads(json.dumps(ask))
    retry["params"].update(requestState=waiting["requestState"], inputResponses={key: {"action": "decline"}})
    elsewhere = await post(replicas.b.url, retry, alice, version=MODERN)
    assert (elsewhere.status, elsewhere.message["error"]["code"]) == (400, -32602)  # start again
    assert (await post(replicas.a.url, retry, alice, version=MODERN)).status == 200
