"""server-everything (2025-11-25 at most, over stdio and HTTP) behind the proxy, used by the Python
SDK client pinned to 2026-07-28: everything goes through the upstream sessions the proxy holds for
each caller, elicitation included (as an input_required round).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from mcp_types import ElicitResult

from proxy.demo import client_for
from tests.conftest import RunningProxy, StartProxy
from tests.interop.test_handshake_only import counted_everything_stdio, text_of

pytestmark = pytest.mark.e2e

MODERN = "2026-07-28"
DOCUMENT = "demo://resource/static/document/architecture.md"


async def answer_name(context: Any, params: Any) -> ElicitResult:
    return ElicitResult(action="accept", content={"name": "Ada Lovelace"})


async def use_everything(running: RunningProxy, user: str) -> list[str]:
    """What a 2026-07-28 client does with server-everything: the texts it got back."""
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    token = running.token("acme", sub=user)
    async with client_for(running.url, token, MODERN, elicitation_callback=answer_name) as client:
        names = [tool.name for tool in (await client.list_tools()).tools]
        assert "trigger-elicitation-request" in names  # offered: the session declared elicitation
        summed = text_of(await client.call_tool("get-sum", {"a": 2, "b": 3}))
        waited = await client.call_tool(
            "trigger-long-running-operation", {"duration": 0.3, "steps": 3}, progress_callback=on_progress
        )
        document = await client.read_resource(DOCUMENT)
        prompt = await client.get_prompt("args-prompt", {"city": "Paris", "state": "IDF"})
        elicited = text_of(await client.call_tool("trigger-elicitation-request", {}))
    assert progress == [1, 2, 3]
    assert "Long running operation completed" in text_of(waited)
    assert document.contents[0].mime_type == "text/markdown"
    return [summed, prompt.messages[0].content.text, elicited]


def assert_used(texts: list[str]) -> None:
    summed, prompt, elicited = texts
    assert summed == "The sum of 2 and 3 is 5."
    assert prompt == "What's weather in Paris, IDF?"
    assert "Ada Lovelace" in elicited


async def test_a_2026_client_uses_server_everything_over_stdio_one_process_per_caller(
    make_proxy: StartProxy, tmp_path: Path
) -> None:
    starts, command = counted_everything_stdio(tmp_path)
    running = await make_proxy(
        {"acme": "http://unused.invalid/mcp"},
        tenants={"acme": {"upstream": {"command": command}}},
        readiness={"upstreams": "ignore"},
    )
    alice, bob = await asyncio.gather(use_everything(running, "alice"), use_everything(running, "bob"))
    assert_used(alice)
    assert_used(bob)
    # the era probe's process, then one per caller (per_session: a held session is a process)
    assert starts.read_text().count("started") == 3


async def test_a_2026_client_uses_server_everything_over_http(
    make_proxy: StartProxy, everything_http: str
) -> None:
    running = await make_proxy({"acme": everything_http})
    assert_used(await use_everything(running, "alice"))
