"""Server-sent events: decode an upstream byte stream into events, encode events for a client.

Decoding uses httpx-sse's WHATWG line and event decoders (the maintained implementation of the
"interpreting an event stream" algorithm); the package imports httpx at import time, which is why
httpx is a dependency although the proxy's HTTP client is its own (upstreams/http_client.py). The byte
stream is aiohttp's StreamReader, which that client's parser fills as the upstream writes.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import StreamReader
from httpx_sse._decoders import SSEDecoder, SSELineDecoder

from proxy.protocol.errors import UpstreamError


@dataclass(frozen=True, slots=True)
class Event:
    data: str
    event: str = "message"
    id: str = ""  # the stream's last event id when this event was dispatched ("" when none)
    retry: int | None = None


@dataclass(frozen=True, slots=True)
class Comment:
    """A comment line (keep-alive); relayed so intermediaries keep the connection open."""


KEEPALIVE = Comment()
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


async def read_event_batches(
    stream: StreamReader, max_event_bytes: int
) -> AsyncIterator[list[Event | Comment]]:
    """The events of an SSE body, as they arrive: one list per network read, so a relay can pass on
    everything that came together in one write. An oversized event is an upstream error."""
    text_decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")  # a leading BOM is not data
    lines = SSELineDecoder()
    events = SSEDecoder()
    pending = 0
    last_id = ""
    async for chunk in stream.iter_any():
        batch: list[Event | Comment] = []
        for line in lines.decode(text_decoder.decode(chunk)):
            if line.startswith(":"):
                batch.append(KEEPALIVE)
                continue
            event = events.decode(line)
            if event is None:
                pending += len(line)
                if pending > max_event_bytes:
                    raise UpstreamError("The upstream MCP server sent an oversized event")
                continue
            pending = 0
            if event.data or event.id != last_id or event.retry is not None:
                # An event without data only counts when it moves the last event id (priming).
                last_id = event.id
                batch.append(Event(data=event.data, event=event.event, id=event.id, retry=event.retry))
        if sum(len(part) for part in lines.buffer) > max_event_bytes:
            raise UpstreamError("The upstream MCP server sent an oversized event")
        if batch:
            yield batch
    final: list[Event | Comment] = []
    for line in lines.decode(text_decoder.decode(b"", final=True)) + lines.flush():
        event = events.decode(line)
        if event is not None and (event.data or event.id != last_id):
            final.append(Event(data=event.data, event=event.event, id=event.id, retry=event.retry))
    if final:
        yield final


async def read_events(stream: StreamReader, max_event_bytes: int) -> AsyncIterator[Event | Comment]:
    """The events of an SSE body one by one, as they arrive."""
    async for batch in read_event_batches(stream, max_event_bytes):
        for item in batch:
            yield item


def encode_event(data: bytes | str, event_id: str | None = None, retry: int | None = None) -> bytes:
    """One `message` event; multi-line data becomes several data lines, as the format requires."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    parts = []
    if event_id:
        parts.append(f"id: {event_id}\n")
    if retry is not None:
        parts.append(f"retry: {retry}\n")
    if text:
        parts.append("event: message\n")
        parts.extend(f"data: {line}\n" for line in _LINE_BREAK.split(text))
    elif parts:
        # A priming event: an id (and retry) with empty data, written as the SDKs' servers write it;
        # a client that drops events without a data field (the TypeScript SDK) would miss the id.
        parts.append("data: \n")
    parts.append("\n")
    return "".join(parts).encode("utf-8")


KEEPALIVE_BYTES = b": keep-alive\n\n"
