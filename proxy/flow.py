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
`Around` stage, which wraps the rest of the flow like middleware does: it takes a resource on the
way in (`enter`) and gives it back itself on the way out (`leave`), whatever ended the flow. The
runner enters them in order and leaves them in reverse in one flat loop (a try/finally around the
rest), so a request's await chain stays short however many stages wrap it.
A response hook sees each message the upstream sends while answering (the answer, and on streams
notifications and server-to-client requests) and returns it, changed or not, or None to drop it.
"""

from __future__ import annotations

import enum
import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from aiohttp import web

from proxy.protocol.jsonrpc import answer_bytes, dumps
from proxy.types import Era, JsonObject, RequestId, TenantContext, principal_hash

if TYPE_CHECKING:
    from proxy.layers.sessions.registry import Session
    from proxy.protocol.jsonrpc import Message
    from proxy.runtime import Runtime, Services
    from proxy.tenants.directory import TenantRuntime
    from proxy.upstreams.base import Upstream

Reply = web.StreamResponse
E = TypeVar("E", bound="Exchange")
E_in = TypeVar("E_in", bound="Exchange", contravariant=True)
C = TypeVar("C", bound="Call")


@dataclass(eq=False, kw_only=True, slots=True)
class Exchange:
    """One HTTP request to the MCP endpoint, from the edge to its report (mitmproxy's flow, for MCP).

    One object all along; what a phase guarantees is in its type: `authenticated` turns an
    Exchange into a Call and `parsed` a Call into a Request, and only those set what the phase's
    type says is there (the report reads the optional fields, which are None until then)."""

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
    limited: str | None = None  # the tenant's limit that refused it: logged in aggregate, not per line
    result_bytes: int = 0
    result_sha256: str | None = None
    upstream_seconds: float = 0.0  # time spent waiting for the upstream
    upstream_contacted: bool = False
    delivered: bool = False  # the answer has been written to the client (a stream may still drain)
    stream: web.StreamResponse | None = None  # an SSE answer under way: where a stop's error goes
    duration_seconds: float = 0.0  # set when the exchange finished (reports run after)
    ended_at: float | None = None  # the same moment in wall-clock time, for the audit record
    # Known once authenticated (Call).
    ctx: TenantContext | None = None
    tenant: TenantRuntime | None = None
    # Known once parsed (Request): POST only; GET and DELETE carry no message.
    message: Message | None = None
    era: Era | None = None
    protocol_version: str | None = None
    session: Session | None = None
    # MCP routing headers for the upstream request, rendered from the body the proxy forwards.
    upstream_headers: dict[str, str] = field(default_factory=dict)
    # Stage-owned state that hooks of the same layer read back (the cache plan, the catalog entry).
    slots: dict[str, Any] = field(default_factory=dict)
    # Called with the upstream's HTTP status as soon as it answers (the circuit's trial is decided).
    on_upstream_status: list[Callable[[int], None]] = field(default_factory=list)
    upstream_status: int | None = None  # the HTTP status of the upstream's answer to the request
    # Whether the upstream itself failed this call (None: it was not asked, or nothing is known).
    upstream_fault: bool | None = None
    # A task this exchange created or saw finish (audit): a hash of its id, and what happened.
    task: str | None = None
    task_event: str | None = None  # created | completed | failed | cancelled
    # The upstream ended a resumable stream before answering: the answer may come on a resumed GET.
    awaiting_resumption: bool = False
    # What stands in for the tenant's upstream when the two speak different protocol eras (bridge/).
    bridged: Upstream | None = None

    def finished(self) -> None:
        self.duration_seconds = time.perf_counter() - self.started
        self.ended_at = time.time()

    def record_result(self, result: bytes) -> None:
        """What the audit keeps of a result: its size and hash, never its content."""
        self.result_bytes = len(result)
        self.result_sha256 = hashlib.sha256(result).hexdigest()

    def refused(self, status: int, code: int, denied: bool = False) -> None:
        """An error answer is going out: the report says so (a denial outcome set earlier stays)."""
        if self.outcome == "ok":
            self.outcome = "denied" if denied else "error"
        self.error_code = code
        self.status = status

    @property
    def upstream(self) -> Upstream:
        """Where this exchange's upstream messages go: the tenant's upstream, or the era bridge."""
        if self.bridged is not None:
            return self.bridged
        assert self.tenant is not None  # (only authenticated exchanges reach an upstream)
        return self.tenant.upstream

    @property
    def request_id(self) -> RequestId | None:
        return self.message.id if self.message is not None else None

    @property
    def subject_hash(self) -> str | None:
        """The caller as logs may name them: a hash, not the subject claim itself."""
        if self.ctx is None:
            return None
        return principal_hash(self.ctx.tenant, self.ctx.principal)


if TYPE_CHECKING:  # the phases, as the type checker sees them; at run time they are the Exchange

    class Call(Exchange):
        """An authenticated exchange: every stage after authentication gets one."""

        ctx: TenantContext
        tenant: TenantRuntime

        @property
        def subject_hash(self) -> str: ...

    class Request(Call):
        """A Call with its JSON-RPC message parsed and its protocol era decided (POST)."""

        message: Message
        era: Era

else:
    Call = Request = Exchange


def authenticated(exchange: Exchange, ctx: TenantContext, tenant: TenantRuntime) -> Call:
    """Exchange -> Call: the only way an exchange gets its caller and tenant."""
    exchange.ctx, exchange.tenant = ctx, tenant
    return cast("Call", exchange)


def parsed(call: Call, message: Message, era: Era, protocol_version: str | None) -> Request:
    """Call -> Request: the only way a call gets its message and era."""
    call.message, call.era, call.protocol_version = message, era, protocol_version
    return cast("Request", call)


# --- stages and hooks ----------------------------------------------------------------------------

Check = Callable[[E], Awaitable[None]]


class Around(Generic[E_in]):
    """A stage that wraps the rest of the flow: `enter` takes what the exchange needs (it may refuse
    or answer early, as a Check does) and says whether it took anything; `leave` gives that back
    once the flow has ended, whatever ended it (`failure`: the exception, or None). One instance
    serves every exchange: what one exchange took is kept in its `slots`."""

    async def enter(self, call: E_in) -> bool:
        raise NotImplementedError

    def leave(self, call: E_in, failure: BaseException | None) -> None:
        raise NotImplementedError


Stage = Check[E] | Around[E]


class ServerKind(enum.Enum):
    """What an upstream message is, for the response hooks."""

    ANSWER = "answer"  # the answer to the request this exchange forwarded
    NOTIFICATION = "notification"
    SERVER_REQUEST = "server_request"  # a server-to-client request (handshake era)


class ServerMessage:
    """One message from the upstream on its way to the client. A hook that changes it assigns a new
    `body`; the serialised result of an answer is made once and shared (cache, audit, client)."""

    __slots__ = ("_raw", "_raw_of", "answers", "body", "kind")

    def __init__(self, kind: ServerKind, body: JsonObject, answers: Message | None = None) -> None:
        self.kind = kind
        self.body = body
        self.answers = answers  # for an answer: the client request it answers
        self._raw: bytes | None = None
        self._raw_of: JsonObject | None = None  # the body `_raw` was made from

    @property
    def method(self) -> str | None:
        method = self.body.get("method")
        return method if isinstance(method, str) else None

    def result_bytes(self) -> bytes | None:
        """An answer's result, serialised (once), or None when it carries no result object."""
        body = self.body
        if self._raw_of is not body:
            result = body.get("result")
            if self.kind is not ServerKind.ANSWER or not isinstance(result, dict):
                return None
            self._raw, self._raw_of = dumps(result), body
        return self._raw

    def to_bytes(self) -> bytes:
        """The message as the client gets it (an answer around its already serialised result)."""
        raw = self.result_bytes()
        if raw is not None:
            return answer_bytes(self.body.get("id"), raw)
        return dumps(self.body)


ResponseHook = Callable[[Call, ServerMessage], ServerMessage | None]
DoneHook = Callable[[Exchange], None]


@dataclass(frozen=True)
class Hook:
    """A response hook and the messages it is about: kinds, and methods (for an answer, the method
    of the request it answers; for the others, the message's own). None: every method."""

    run: ResponseHook
    kinds: frozenset[ServerKind]
    methods: frozenset[str] | None = None


def hook(run: ResponseHook, *kinds: ServerKind, methods: Sequence[str] | None = None) -> Hook:
    return Hook(run, frozenset(kinds), frozenset(methods) if methods is not None else None)


class Hooks:
    """A flow's response hooks in order; each message passes only those about it (worked out once
    per kind and method, not per message)."""

    def __init__(self, hooks: Sequence[Hook]) -> None:
        self.hooks = tuple(hooks)
        self._chosen: dict[tuple[ServerKind, str | None], tuple[ResponseHook, ...]] = {}

    def about(self, kind: ServerKind, method: str | None) -> tuple[ResponseHook, ...]:
        chosen = self._chosen.get((kind, method))
        if chosen is None:
            chosen = tuple(
                h.run for h in self.hooks if kind in h.kinds and (h.methods is None or method in h.methods)
            )
            if len(self._chosen) < 1024:  # (methods a client names are bounded by what the proxy knows)
                self._chosen[(kind, method)] = chosen
        return chosen


Entered = list[tuple["Around[Any]", Exchange]]  # Around stages entered, with the phase each entered


async def enter_stages(phase: C, stages: Sequence[Check[C] | Around[C]], entered: Entered) -> Reply | None:
    """Run `stages` in order; an Around stage that takes something is added to `entered` (the
    runner leaves them all, in reverse, however the flow ends). The early answer, if any."""
    for stage in stages:
        if isinstance(stage, Around):
            if await stage.enter(phase):
                entered.append((stage, phase))
        else:
            await stage(phase)
        if phase.reply is not None:
            return phase.reply
    return None


def leave_stages(entered: Entered, failure: BaseException | None) -> BaseException | None:
    """Leave the entered Around stages in reverse order; what ended the flow, or what a stage's way
    out raised instead."""
    while entered:
        stage, phase = entered.pop()
        try:
            stage.leave(phase, failure)
        except BaseException as raised:  # a stage's way out failed: that goes on up
            failure = raised
    return failure


def deliver(call: Call, message: ServerMessage, hooks: Hooks) -> JsonObject | None:
    """A server message after the response hooks about it: what the client gets, or None (dropped)."""
    method = message.answers.method if message.answers is not None else message.method
    for run in hooks.about(message.kind, method):
        changed = run(call, message)
        if changed is None:
            return None
        message = changed
    return message.body
