"""One request's whole life: the exchange in its typed phases, the stage and hook types, the runner.

    Exchange   every HTTP request to the MCP endpoint, refused or not: what its report needs
    Call       an authenticated exchange: the caller and the tenant are known (never optional)
    Request    a Call with its parsed JSON-RPC message and protocol era (POST)

A flow (the lists themselves are in http/endpoint.py, one per HTTP method) runs, in order:

    edge checks      (Exchange)            refuse before anything is known (Origin)
    authenticate     Exchange -> Call      the caller and tenant, from the verified token alone
    admitted stages  (Call)                before the body is read: refusals stay cheap
    parse            Call -> Request       the one JSON-RPC message (POST only)
    stages           (Request)             checks, rewrites, early answers (a denial, a cache hit)
    forward          (Request) -> reply    the upstream call; its messages pass the response hooks
    done hooks       (Exchange)            audit record, metrics, log line: just after the answer left

A stage is a `Check` (refuses by raising a ProxyError, answers early by setting `reply`) or an
`Around` stage, which wraps the rest of the flow like Starlette middleware: it takes a resource,
awaits `call_next()` inside try/finally and gives the resource back itself, whatever happened.
A response hook sees each message the upstream sends while answering (the answer, and on streams
notifications and server-to-client requests) and returns it, changed or not, or None to drop it.
"""

from __future__ import annotations

import enum
import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from aiohttp import web

from proxy.protocol.jsonrpc import answer_bytes, dumps
from proxy.types import Era, JsonObject, RequestId, TenantContext

if TYPE_CHECKING:
    from proxy.layers.sessions.registry import Session
    from proxy.protocol.jsonrpc import Message
    from proxy.runtime import Runtime, Services, TenantRuntime

Reply = web.StreamResponse
Next = Callable[[], Awaitable[Reply]]
E = TypeVar("E", bound="Exchange")
C = TypeVar("C", bound="Call")


@dataclass(eq=False, kw_only=True)
class Exchange:
    """One HTTP request to the MCP endpoint, from the edge to its report (mitmproxy's flow, for MCP)."""

    request: web.Request
    runtime: Runtime
    services: Services
    started: float = field(default_factory=time.perf_counter)
    reply: Reply | None = None  # an answer given early (a refusal, a cache hit, a local answer)
    # What happened, for the report (audit record, metrics, log line).
    status: int = 200
    outcome: str = "ok"  # ok | error | denied | spoof | cancelled
    cache_state: str = "bypass"
    error_code: int | None = None
    result_bytes: int = 0
    result_sha256: str | None = None
    upstream_seconds: float = 0.0  # time spent waiting for the upstream
    upstream_contacted: bool = False
    delivered: bool = False  # the answer has been written to the client (a stream may still drain)
    ended: float | None = None  # perf_counter when the exchange finished (reports run after)
    ended_at: float | None = None  # the same moment in wall-clock time, for the audit record

    # What the report reads of later phases (None until then).
    @property
    def caller(self) -> TenantContext | None:
        return None

    @property
    def parsed(self) -> Message | None:
        return None

    @property
    def protocol_era(self) -> Era | None:
        return None

    @property
    def session(self) -> Session | None:
        return None

    @property
    def duration_seconds(self) -> float:
        return (self.ended if self.ended is not None else time.perf_counter()) - self.started

    def record_result(self, result: bytes) -> None:
        """What the audit keeps of a result: its size and hash, never its content."""
        self.result_bytes = len(result)
        self.result_sha256 = hashlib.sha256(result).hexdigest()

    def refused(self, status: int, code: int) -> None:
        """An error answer is going out: the report says so (a denial outcome set earlier stays)."""
        if self.outcome == "ok":
            self.outcome = "denied" if status in (401, 403) else "error"
        self.error_code = code
        self.status = status


@dataclass(eq=False, kw_only=True)
class Call(Exchange):
    """An authenticated exchange: every stage after authentication gets one."""

    ctx: TenantContext
    tenant: TenantRuntime
    message: Message | None = None  # the client's message (POST); GET and DELETE carry none
    era: Era | None = None
    protocol_version: str | None = None
    bound_session: Session | None = None
    # MCP routing headers for the upstream request, rendered from the body the proxy forwards.
    upstream_headers: dict[str, str] = field(default_factory=dict)
    # Stage-owned state that hooks of the same layer read back (the cache plan, the catalog entry).
    slots: dict[str, Any] = field(default_factory=dict)
    # Called with the upstream's HTTP status as soon as it answers (the circuit's trial is decided).
    on_upstream_status: list[Callable[[int], None]] = field(default_factory=list)
    # Whether the upstream itself failed this call (None: it was not asked, or nothing is known).
    upstream_fault: bool | None = None

    @classmethod
    def of(cls: type[C], exchange: Exchange, **fields: Any) -> C:
        """The next phase of `exchange`: the same request, with what the phase adds."""
        base = {name: getattr(exchange, name) for name in _EXCHANGE_FIELDS}
        if isinstance(exchange, Call):
            base.update({name: getattr(exchange, name) for name in _CALL_FIELDS})
        return cls(**{**base, **fields})

    @property
    def caller(self) -> TenantContext:
        return self.ctx

    @property
    def parsed(self) -> Message | None:
        return self.message

    @property
    def protocol_era(self) -> Era | None:
        return self.era

    @property
    def session(self) -> Session | None:
        return self.bound_session

    @property
    def request_id(self) -> RequestId | None:
        return self.message.id if self.message is not None else None

    @property
    def subject_hash(self) -> str:
        """The caller as logs may name them: a hash, not the subject claim itself."""
        return hashlib.sha256(f"{self.ctx.tenant}\0{self.ctx.subject}".encode()).hexdigest()[:16]


@dataclass(eq=False, kw_only=True)
class Request(Call):
    """A Call with its JSON-RPC message parsed and its protocol era decided (POST)."""

    message: Message
    era: Era

    @property
    def request_id(self) -> RequestId | None:
        return self.message.id


_EXCHANGE_FIELDS = tuple(f for f in Exchange.__dataclass_fields__)
_CALL_FIELDS = tuple(f for f in Call.__dataclass_fields__ if f not in Exchange.__dataclass_fields__)


# --- stages and hooks ----------------------------------------------------------------------------

Check = Callable[[E], Awaitable[None]]
AroundFn = Callable[[E, Next], Awaitable[Reply]]


@dataclass(frozen=True)
class Around(Generic[E]):
    """A stage that wraps the rest of the flow (see the module docstring)."""

    run: Callable[[E, Next], Awaitable[Reply]]

    @property
    def __name__(self) -> str:
        return getattr(self.run, "__name__", "around")


Stage = Check[E] | Around[E]


def around(fn: AroundFn[E]) -> Around[E]:
    return Around(fn)


class Kind(enum.Enum):
    """What an upstream message is, for the response hooks."""

    ANSWER = "answer"  # the answer to the request this exchange forwarded
    NOTIFICATION = "notification"
    SERVER_REQUEST = "server_request"  # a server-to-client request (handshake era)


class ServerMessage:
    """One message from the upstream on its way to the client. A hook that changes it assigns
    `body`; the serialised result of an answer is made once and shared (cache, audit, client)."""

    __slots__ = ("_body", "_result_raw", "answers", "kind")

    def __init__(self, kind: Kind, body: JsonObject, answers: Message | None = None) -> None:
        self.kind = kind
        self._body = body
        self.answers = answers  # for an answer: the client request it answers
        self._result_raw: bytes | None = None

    @property
    def body(self) -> JsonObject:
        return self._body

    @body.setter
    def body(self, body: JsonObject) -> None:
        self._body = body
        self._result_raw = None

    @property
    def method(self) -> str | None:
        method = self._body.get("method")
        return method if isinstance(method, str) else None

    def result_bytes(self) -> bytes | None:
        """An answer's result, serialised (once), or None when it carries no result object."""
        if self._result_raw is None:
            result = self._body.get("result")
            if self.kind is not Kind.ANSWER or not isinstance(result, dict):
                return None
            self._result_raw = dumps(result)
        return self._result_raw

    def to_bytes(self) -> bytes:
        """The message as the client gets it (an answer around its already serialised result)."""
        raw = self.result_bytes()
        if raw is not None:
            return answer_bytes(self._body.get("id"), raw)
        return dumps(self._body)


ResponseHook = Callable[[Call, ServerMessage], ServerMessage | None]
DoneHook = Callable[[Exchange], None]


async def run_stages(
    call: C, stages: Sequence[Check[C] | Around[C]], last: Callable[[C], Awaitable[Reply]]
) -> Reply:
    """Run `stages` in order, then `last`; a Check may answer early, an Around wraps the rest."""

    async def step(index: int) -> Reply:
        for position in range(index, len(stages)):
            stage = stages[position]
            if isinstance(stage, Around):
                return await stage.run(call, partial(step, position + 1))
            await stage(call)
            if call.reply is not None:
                return call.reply
        return await last(call)

    return await step(0)


def deliver(call: Call, message: ServerMessage, hooks: Sequence[ResponseHook]) -> JsonObject | None:
    """A server message after every response hook: what the client gets, or None (dropped)."""
    for hook in hooks:
        changed = hook(call, message)
        if changed is None:
            return None
        message = changed
    return message.body
