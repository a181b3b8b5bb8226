"""subscriptions/listen on held sessions: resources/subscribe and the session's own GET stream.

A 2026-07-28 client opts in to change notifications with one long request; a handshake-era server
sends them, for the whole session, on its GET stream (list_changed) and for the resources the
session subscribed to (resources/updated). So a listen on a held session:

    acknowledged   what the session's server capabilities can honor of the filter: list_changed
                   of the lists it says change, resource updates when it offers subscribe
    subscribes     resources/subscribe on the held session for each URI no listen of it has yet
    listens        to the session's GET stream (one reader per held session, reconnecting with
                   Last-Event-ID): each change notification goes to the listens whose filter wants
                   it, stamped with their subscriptionId
    ends           when the client closes it (URIs no other listen wants are unsubscribed), or
                   gracefully (its result) when the held session ends (idle, reload, shutdown)
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

from proxy.bridge.answers import event
from proxy.bridge.held import HeldSession, HeldSessions, post, post_and_close
from proxy.bridge.shapes import member
from proxy.protocol.errors import ProxyError, UpstreamError
from proxy.protocol.sse import KEEPALIVE, Comment, Event
from proxy.types import JsonObject, RequestId
from proxy.upstreams.base import EVENT_STREAM, UpstreamRequest, answer_to, incoming

log = structlog.get_logger("proxy.bridge")

SUBSCRIPTION_ID: Final = "io.modelcontextprotocol/subscriptionId"
KEEPALIVE_SECONDS: Final = 15.0
RECONNECT_SECONDS: Final = 1.0  # after the GET stream dropped (a read timeout, the server's restart)
MAX_QUEUED: Final = 256
LIST_CHANGED: Final = {
    "notifications/tools/list_changed": ("toolsListChanged", "tools"),
    "notifications/prompts/list_changed": ("promptsListChanged", "prompts"),
    "notifications/resources/list_changed": ("resourcesListChanged", "resources"),
}
_END: Final = object()
_ids = itertools.count(1)


@dataclass(eq=False)
class Listener:
    listen_id: RequestId
    wanted: frozenset[str]  # the honored filter's list_changed keys
    uris: frozenset[str]
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)  # (bounded by `offer`)

    def offer(self, message: JsonObject) -> None:
        """A change notification for this listen, stamped with its id; a backlog beyond the bound
        is dropped (list changes repeat; the client refetches)."""
        params = member(message, "params")
        meta = member(params, "_meta")
        stamped = {**message, "params": {**params, "_meta": {**meta, SUBSCRIPTION_ID: self.listen_id}}}
        if self.queue.qsize() < MAX_QUEUED:
            self.queue.put_nowait(stamped)

    def wants(self, message: JsonObject) -> bool:
        method = message.get("method")
        if method in LIST_CHANGED:
            return LIST_CHANGED[method][0] in self.wanted
        params = message.get("params")
        return (
            method == "notifications/resources/updated"
            and isinstance(params, dict)
            and params.get("uri") in self.uris
        )


@dataclass(eq=False)
class Feed:
    """One held session's GET stream and the listens on it."""

    held: HeldSession
    listeners: set[Listener] = field(default_factory=set)
    subscribed: dict[str, int] = field(default_factory=dict)  # URI -> listens that want it
    reader: asyncio.Task[None] | None = None


class ListenStream:
    """The relay's view of one listen: the acknowledgment, then change notifications as they come."""

    status = 200
    content_type = EVENT_STREAM
    session_id: str | None = None
    retry_after: str | None = None

    def __init__(self, listens: Listens, feed: Feed, listener: Listener, acknowledged: JsonObject) -> None:
        self._listens, self._feed, self._listener, self._ack = listens, feed, listener, acknowledged

    async def read_json(self) -> bytes:
        raise UpstreamError("A listen answers as a stream")

    async def events(self) -> AsyncIterator[list[Event | Comment]]:
        yield [event(self._ack)]
        queue = self._listener.queue
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                yield [KEEPALIVE]
                continue
            if item is _END:  # the held session ended: the listen closes gracefully
                result = {"resultType": "complete", "_meta": {SUBSCRIPTION_ID: self._listener.listen_id}}
                yield [event({"jsonrpc": "2.0", "id": self._listener.listen_id, "result": result})]
                return
            batch = [item]
            while not queue.empty():
                batch.append(queue.get_nowait())
            yield [event(message) for message in batch if message is not _END]

    def close(self) -> None:
        self._listens.leave(self._feed, self._listener)


class Listens:
    def __init__(self, sessions: HeldSessions) -> None:
        self.sessions = sessions
        self.upstream = sessions.upstream
        self._feeds: dict[int, Feed] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def open(self, held: HeldSession, body: JsonObject) -> ListenStream:
        asked = member(member(body, "params"), "notifications")
        capabilities = member(held.initialize_result, "capabilities")
        wanted = frozenset(
            key
            for key, kind in LIST_CHANGED.values()
            if asked.get(key) is True and _offers(capabilities, kind, "listChanged")
        )
        uris = asked.get("resourceSubscriptions") if _offers(capabilities, "resources", "subscribe") else None
        feed = self._feeds.setdefault(id(held), Feed(held))
        honored_uris = [
            uri for uri in uris or () if isinstance(uri, str) and await self._subscribe(feed, uri)
        ]
        listener = Listener(body["id"], wanted, frozenset(honored_uris))
        feed.listeners.add(listener)
        if feed.reader is None:
            feed.reader = asyncio.create_task(self._read(feed), name=f"bridge-listen-{self.sessions.tenant}")
        honored: JsonObject = dict.fromkeys(sorted(wanted), True)
        if honored_uris:
            honored["resourceSubscriptions"] = honored_uris
        ack = {
            "jsonrpc": "2.0",
            "method": "notifications/subscriptions/acknowledged",
            "params": {"notifications": honored, "_meta": {SUBSCRIPTION_ID: listener.listen_id}},
        }
        return ListenStream(self, feed, listener, ack)

    async def _subscribe(self, feed: Feed, uri: str) -> bool:
        """resources/subscribe for the first listen of the held session that wants `uri`."""
        if feed.subscribed.get(uri):
            feed.subscribed[uri] += 1
            return True
        request_id = f"mcp-tenant-proxy-bridge-subscribe-{next(_ids)}"
        message = {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": "resources/subscribe",
            "params": {"uri": uri},
        }
        try:
            response = await post(self.upstream, feed.held, message)
            try:
                answer = await answer_to(response, request_id) if response.status == 200 else None
            finally:
                response.close()
        except ProxyError:
            answer = None
        if answer is None or not isinstance(answer.get("result"), dict):
            return False  # not honored: the acknowledgment leaves the URI out
        feed.subscribed[uri] = 1
        return True

    def leave(self, feed: Feed, listener: Listener) -> None:
        """The listen ended: URIs nobody else wants are unsubscribed, an unused feed stops."""
        if listener not in feed.listeners:
            return
        feed.listeners.discard(listener)
        for uri in listener.uris:
            feed.subscribed[uri] -= 1
            if feed.subscribed[uri] == 0:
                del feed.subscribed[uri]
                if not feed.held.ended:
                    request_id = f"mcp-tenant-proxy-bridge-unsubscribe-{next(_ids)}"
                    params = {"uri": uri}
                    unsubscribe = {
                        "jsonrpc": "2.0",
                        "id": request_id,
                        "method": "resources/unsubscribe",
                        "params": params,
                    }
                    self._spawn(post_and_close(self.upstream, feed.held, unsubscribe))
        if not feed.listeners:
            if feed.reader is not None:
                feed.reader.cancel()
            self._feeds.pop(id(feed.held), None)

    async def _read(self, feed: Feed) -> None:
        """The held session's GET stream while anyone listens; its end ends the listens."""
        held, last_event_id = feed.held, ""
        try:
            while feed.listeners and not held.ended:
                headers = {k: v for k, v in held.headers(EVENT_STREAM).items() if k != "Content-Type"}
                if last_event_id:
                    headers["Last-Event-ID"] = last_event_id
                try:
                    response = await self.upstream.send(UpstreamRequest("GET", headers, None, held.principal))
                except ProxyError:
                    response = None
                if response is not None and response.status in (404, 405):
                    response.close()
                    break  # the session is gone, or has no stream to listen to
                if response is not None:
                    try:
                        async for batch in incoming(response):
                            for item in batch:
                                last_event_id = item.event_id or last_event_id
                                if item.message is not None:
                                    for listener in list(feed.listeners):
                                        if listener.wants(item.message):
                                            listener.offer(item.message)
                    except ProxyError:
                        pass  # (a read timeout on a quiet stream, a dropped connection: reconnect)
                    finally:
                        response.close()
                if feed.listeners and not held.ended:
                    await asyncio.sleep(RECONNECT_SECONDS)
        finally:
            for listener in feed.listeners:
                listener.queue.put_nowait(_END)

    def close(self) -> None:
        """Reload or shutdown: every listen ends gracefully (its result), so its held session is
        given back and ends."""
        for feed in list(self._feeds.values()):
            if feed.reader is not None:
                feed.reader.cancel()  # (its way out ends the listens)

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _offers(capabilities: JsonObject, kind: str, flag: str) -> bool:
    section = capabilities.get(kind)
    return isinstance(section, dict) and section.get(flag) is True
