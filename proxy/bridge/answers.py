"""Answers the bridge gives the relay itself, shaped like an upstream's (the Upstream protocol)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from proxy.protocol.jsonrpc import dumps
from proxy.protocol.sse import Comment, Event
from proxy.types import JsonObject, RequestId
from proxy.upstreams.base import JSON


class Answered:
    """A JSON answer (or, without a body, an empty acknowledgement)."""

    def __init__(self, status: int, body: JsonObject | None = None, session_id: str | None = None) -> None:
        self.status = status
        self.content_type = JSON if body is not None else ""
        self.session_id = session_id
        self.retry_after: str | None = None
        self._body = body

    @classmethod
    def result(
        cls, request_id: RequestId | None, result: JsonObject, session_id: str | None = None
    ) -> Answered:
        return cls(200, {"jsonrpc": "2.0", "id": request_id, "result": result}, session_id)

    @classmethod
    def error(cls, status: int, request_id: RequestId | None, code: int, message: str) -> Answered:
        return cls(status, {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}})

    async def read_json(self) -> bytes:
        return dumps(self._body or {})

    async def events(self) -> AsyncIterator[list[Event | Comment]]:
        return
        yield  # (an async generator with nothing in it: a JSON answer has no events)

    def close(self) -> None:
        """Nothing is held."""


def event(message: JsonObject) -> Event:
    return Event(data=dumps(message).decode())
