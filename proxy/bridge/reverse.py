"""Handshake-era clients served by a 2026-07-28 upstream that keeps no sessions of its own.

initialize             forwarded as it is; an upstream that answers it with a session keeps
                       serving it unbridged. One that answers without a session (stateless) or
                       refuses it, and speaks 2026-07-28, is bridged: the proxy keeps the session
                       on its side (its upstream session id is a token holding what the bridge
                       keeps of the client's capabilities and info, bounded: declared.py; so any
                       replica can serve it) and answers
                       initialize from the upstream's answer or from server/discover
a request              sent statelessly with the _meta the session's initialize (and
                       logging/setLevel) makes (reverse_calls.py)
an answer              to a server request of a call: goes to that call (reverse_calls.py)
ping, setLevel         answered here; GET is a stream of keep-alives; DELETE forgets the session
resources/subscribe,   refused (-32601): not bridged
  tasks
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any, Final

from proxy.bridge.answers import Answered
from proxy.bridge.declared import declared
from proxy.bridge.reverse_calls import ReverseCalls
from proxy.bridge.shapes import (
    LOG_LEVELS,
    initialize_result,
    member,
    modern_envelope,
    reverse_session_state,
    reverse_session_token,
    without_tasks,
)
from proxy.layers.data_access.catalog import Catalog
from proxy.protocol.errors import UpstreamError
from proxy.protocol.sse import KEEPALIVE, Comment, Event
from proxy.types import JsonObject
from proxy.upstreams.base import (
    EVENT_STREAM,
    JSON,
    Upstream,
    UpstreamRequest,
    UpstreamResponse,
    answer_to,
    parse_upstream,
)
from proxy.upstreams.eras import UpstreamEras

KEEPALIVE_SECONDS: Final = 15.0
MAX_SESSIONS_REMEMBERED: Final = 10_000  # log levels kept per session (the oldest forgotten first)
NOT_BRIDGED: Final = frozenset(
    {
        "resources/subscribe",
        "resources/unsubscribe",
        "tasks/get",
        "tasks/result",
        "tasks/list",
        "tasks/cancel",
    }
)
_ids = itertools.count(1)


class IdleStream:
    """A bridged session's GET stream: the upstream has none, so it carries keep-alives only."""

    status = 200
    content_type = EVENT_STREAM
    session_id: str | None = None
    retry_after: str | None = None

    async def read_json(self) -> bytes:
        return b"{}"

    async def events(self) -> AsyncIterator[list[Event | Comment]]:
        while True:
            await asyncio.sleep(KEEPALIVE_SECONDS)
            yield [KEEPALIVE]

    def close(self) -> None:
        """Nothing is held."""


class ReverseBridge:
    def __init__(
        self, upstream: Upstream, eras: UpstreamEras, catalog: Catalog, answer_timeout_seconds: float
    ) -> None:
        self.tenant = upstream.tenant
        self.identity = upstream.identity
        self.upstream = upstream
        self.eras = eras
        self.calls = ReverseCalls(upstream, catalog, answer_timeout_seconds)
        self._levels: OrderedDict[str, str] = OrderedDict()  # session token -> logging/setLevel

    # --- the Upstream protocol, for the bridged sessions' exchanges ------------------------------

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        token = request.headers.get("Mcp-Session-Id")
        if reverse_session_state(token) is None:  # an initialize, or the upstream's own session
            if request.http_method == "POST" and token is None:
                return await self._initialize(request, parse_upstream(request.body or b"{}"))
            return await self.upstream.send(request)
        assert token is not None
        if request.http_method == "DELETE":
            self._levels.pop(token, None)
            return Answered(200)
        if request.http_method == "GET":
            return IdleStream()
        body = parse_upstream(request.body or b"{}")
        method, request_id = body.get("method"), body.get("id")
        if method is None:  # the client's answer to a server request of a call
            self.calls.answered(token, body)
            return Answered(202)
        if request_id is None:
            if method == "notifications/cancelled":
                self.calls.cancel(token, body.get("params"))
            return Answered(202)
        if method == "ping":
            return Answered.result(request_id, {})
        if method == "logging/setLevel":
            if not self._remember_level(token, body.get("params")):
                return Answered.error(200, request_id, -32602, "Invalid params: level must be one of "
                                      + ", ".join(LOG_LEVELS))  # fmt: skip
            return Answered.result(request_id, {})
        if method in NOT_BRIDGED:
            return Answered.error(200, request_id, -32601, f"Method not found: {method} is not bridged to "
                                  "this tenant's 2026-07-28 MCP server")  # fmt: skip
        params = body.get("params")
        if isinstance(params, dict) and "task" in params:  # (no task capability was offered: see shapes)
            body = {**body, "params": {key: value for key, value in params.items() if key != "task"}}
        return await self.calls.start(token, body, self._envelope(token), request.principal)

    async def sweep(self) -> None:
        """Nothing to tidy: what a call waits for ends with it."""

    async def close(self) -> None:
        self.calls.close()

    # --- initialize ------------------------------------------------------------------------------

    async def _initialize(self, request: UpstreamRequest, body: JsonObject) -> UpstreamResponse:
        """Forwarded; bridged when the upstream keeps no session but speaks 2026-07-28."""
        response = await self.upstream.send(request)
        if response.session_id is not None or response.status not in (200, 400, 404, 405):
            return response
        try:
            if response.status == 200:
                answer = await answer_to(response, body.get("id"))
            else:
                answer = parse_upstream(await response.read_json()) if response.content_type == JSON else None
        finally:
            response.close()
        if await self.eras.speaks_modern(self.upstream) is not True:
            return Answered(response.status, answer)  # as the upstream answered it: not bridged
        params = member(body, "params")
        token = reverse_session_token(declared(params.get("capabilities"), params.get("clientInfo")))
        result = answer.get("result") if answer is not None else None
        if not isinstance(result, dict):  # it refused initialize: the session is answered from discover
            discover = await self._discover(token, request.principal)
            result = initialize_result(params.get("protocolVersion"), discover)
        elif isinstance(result.get("capabilities"), dict):
            result = {**result, "capabilities": without_tasks(result["capabilities"])}
        return Answered.result(body.get("id"), result, session_id=token)

    async def _discover(self, token: str, principal: str | None) -> JsonObject:
        request_id = f"mcp-tenant-proxy-bridge-discover-{next(_ids)}"
        body = {"jsonrpc": "2.0", "id": request_id, "method": "server/discover",
                "params": {"_meta": self._envelope(token)}}  # fmt: skip
        response = await self.calls.post(body, principal)
        try:
            answer = await answer_to(response, request_id) if response.status == 200 else None
        finally:
            response.close()
        result = answer.get("result") if answer is not None else None
        if not isinstance(result, dict):
            raise UpstreamError("The upstream MCP server did not answer server/discover")
        return result

    def _envelope(self, token: str) -> JsonObject:
        state = reverse_session_state(token)
        capabilities, client_info = state if state is not None else ({}, {})
        return modern_envelope(capabilities, client_info, self._levels.get(token))

    def _remember_level(self, token: str, params: Any) -> bool:
        """Whether the level is one MCP defines (only such a level is kept)."""
        level = params.get("level") if isinstance(params, dict) else None
        if level not in LOG_LEVELS:
            return False
        self._levels[token] = level
        self._levels.move_to_end(token)
        while len(self._levels) > MAX_SESSIONS_REMEMBERED:
            self._levels.popitem(last=False)
        return True
