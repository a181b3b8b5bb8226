"""subscriptions/listen bridged to a handshake-only SDK server: the listens of a caller are served
by the subscriptions and the GET stream of the caller's own held session."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from mcp.client.subscriptions import ResourceUpdated

from proxy.demo import client_for
from proxy.http.keys import RUNTIME
from tests.conftest import StartProxy
from tests.e2e.test_bridging_e2e import MODERN, bodies, deleted, handshake_only, upstream, wait_for

pytestmark = pytest.mark.e2e
__all__ = ["handshake_only", "upstream"]  # (the fixtures, shared with test_bridging_e2e)


async def test_a_listen_gets_its_own_sessions_resource_updates_and_nobody_elses(
    make_proxy: StartProxy, upstream: Any
) -> None:
    running = await make_proxy({"acme": upstream})
    alice_uri, bob_uri = "notes://acme/alice-notes", "notes://acme/bob-notes"
    alice = client_for(running.url, running.token("acme", sub="alice"), MODERN)
    bob = client_for(running.url, running.token("acme", sub="bob"), MODERN)
    async with (
        alice,
        bob,
        alice.listen(resource_subscriptions=[alice_uri], tools_list_changed=True) as alice_listen,
        bob.listen(resource_subscriptions=[alice_uri, bob_uri]) as bob_listen,
    ):
        assert alice_listen.honored.resource_subscriptions == [alice_uri]
        assert alice_listen.honored.tools_list_changed is None  # (the server's lists never change)
        assert bob_listen.honored.resource_subscriptions == [alice_uri, bob_uri]
        await alice.call_tool("broadcast_update", {"uri": alice_uri})
        assert await asyncio.wait_for(anext(alice_listen), 10) == ResourceUpdated(uri=alice_uri)
        await bob.call_tool("broadcast_update", {"uri": bob_uri})
        # alice's update (on her session) never reached bob's listen: his next event is his own
        assert await asyncio.wait_for(anext(bob_listen), 10) == ResourceUpdated(uri=bob_uri)
    subscribes = bodies(upstream, "resources/subscribe")
    by_session: dict[str | None, list[str]] = {}
    for session, message in subscribes:
        by_session.setdefault(session, []).append(message["params"]["uri"])
    assert sorted(by_session.values()) == [[alice_uri], [alice_uri, bob_uri]]
    # the listens closed: their subscriptions end upstream
    assert await wait_for(lambda: len(bodies(upstream, "resources/unsubscribe")) == 3)


async def test_a_reload_ends_a_listen_gracefully_and_then_its_held_session(
    make_proxy: StartProxy, upstream: Any
) -> None:
    running = await make_proxy({"acme": upstream})
    client = client_for(running.url, running.token("acme"), MODERN)
    async with client, client.listen(resource_subscriptions=["notes://acme/x"]) as listening:
        running.app[RUNTIME].current.retire_bridges()  # what a reload does to the runtime it replaced
        with pytest.raises(StopAsyncIteration):  # the listen's result: a graceful end, not a loss
            await asyncio.wait_for(anext(listening), 10)
    ((session, _),) = bodies(upstream, "resources/subscribe")
    assert await wait_for(lambda: deleted(upstream) == [session])
