"""SSE decoding over a real aiohttp StreamReader (split at every byte boundary) and encode_event."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from unittest import mock

import pytest
from aiohttp import StreamReader

from proxy.protocol.errors import UpstreamError
from proxy.protocol.jsonrpc import dumps
from proxy.protocol.sse import KEEPALIVE, KEEPALIVE_BYTES, Comment, Event, encode_event, read_events

MAX = 10_000


def reader(chunks: Iterable[bytes]) -> StreamReader:
    stream = StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
    for chunk in chunks:
        if chunk:
            stream.feed_data(chunk)
    stream.feed_eof()
    return stream


async def decode(chunks: Iterable[bytes], max_event_bytes: int = MAX) -> list[Event | Comment]:
    return [item async for item in read_events(reader(chunks), max_event_bytes)]


def splits(data: bytes) -> Iterable[list[bytes]]:
    """The whole body, every two-chunk split, and one byte at a time."""
    yield [data]
    for index in range(1, len(data)):
        yield [data[:index], data[index:]]
    yield [data[i : i + 1] for i in range(len(data))]


async def decode_every_way(data: bytes, max_event_bytes: int = MAX) -> list[Event | Comment]:
    results = [await decode(chunks, max_event_bytes) for chunks in splits(data)]
    for result in results[1:]:
        assert result == results[0]
    return results[0]


# --- line endings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
async def test_events_with_each_line_ending(eol: bytes) -> None:
    data = eol.join(
        [
            b": keep-alive",
            b"id: 7",
            b"retry: 1500",
            b"data: first",
            b"data: second",
            b"",
            b"event: custom",
            b'data: {"k": "\xc3\xa9"}',
            b"",
            b"",
        ]
    )
    assert await decode_every_way(data) == [
        KEEPALIVE,
        Event(data="first\nsecond", event="message", id="7", retry=1500),
        Event(data='{"k": "\u00e9"}', event="custom", id="7", retry=None),
    ]


async def test_mixed_line_endings_in_one_stream() -> None:
    data = b"data: a\r\ndata: b\rdata: c\n\r\nid: 9\rdata: d\r\n\n"
    assert await decode_every_way(data) == [
        Event(data="a\nb\nc"),
        Event(data="d", id="9"),
    ]


async def test_crlf_split_between_chunks_is_one_line_ending() -> None:
    # "\r" at the end of one chunk and "\n" at the start of the next must not make an empty line.
    assert await decode([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]) == [Event(data="a\nb")]


# --- comments, fields, ids ------------------------------------------------------------------------


async def test_comments_are_keepalives() -> None:
    data = b":\n: ping\n:data: not data\n\ndata: x\n\n"
    items = await decode_every_way(data)
    assert items == [KEEPALIVE, KEEPALIVE, KEEPALIVE, Event(data="x")]
    assert all(isinstance(item, Comment) for item in items[:3])


async def test_field_parsing_rules() -> None:
    data = (
        b"data:no-space\n\n"
        b"data:  two spaces\n\n"
        b"data\n\n"
        b"data: x\nunknown: y\n\n"
        b"retry: abc\ndata: r\n\n"
        b"id: a\x00b\ndata: nul-id-ignored\n\n"
    )
    assert await decode_every_way(data) == [
        Event(data="no-space"),
        Event(data=" two spaces"),
        # "data" alone dispatches an empty event; with nothing to deliver and no id to move, it is dropped
        Event(data="x"),
        Event(data="r", retry=None),
        Event(data="nul-id-ignored", id=""),
    ]


async def test_last_event_id_persists_until_changed() -> None:
    data = b"id: 1\ndata: a\n\ndata: b\n\nid: 2\ndata: c\n\nid\ndata: d\n\n"
    assert [(e.data, e.id) for e in await decode_every_way(data) if isinstance(e, Event)] == [
        ("a", "1"),
        ("b", "1"),
        ("c", "2"),
        ("d", ""),
    ]


async def test_priming_event_without_data_carries_its_id() -> None:
    assert await decode_every_way(b"id: 42\n\n") == [Event(data="", id="42")]


async def test_extra_blank_lines_dispatch_nothing() -> None:
    assert await decode([b"id: 1\ndata: a\n\n\n\n\n"]) == [Event(data="a", id="1")]


async def test_incomplete_event_at_eof_is_discarded() -> None:
    assert await decode_every_way(b"data: complete\n\ndata: cut off") == [Event(data="complete")]
    assert await decode_every_way(b"data: cut off\n") == []


async def test_multibyte_utf8_split_anywhere() -> None:
    text = "\u00e9\u65e5\U0001f600"
    data = f"data: {text}\n\n".encode()
    assert await decode_every_way(data) == [Event(data=text)]


async def test_invalid_utf8_is_replaced_not_fatal() -> None:
    assert await decode_every_way(b"data: a\xffb\n\n") == [Event(data="a\ufffdb")]


async def test_leading_bom_is_ignored() -> None:
    assert await decode([b"\xef\xbb\xbfdata: first\n\n"]) == [Event(data="first")]


# --- oversized events ---------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 7, 100, 100_000])
async def test_oversized_event_is_an_upstream_error(chunk_size: int) -> None:
    data = b"data: " + b"x" * 2_000 + b"\n\n"
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    with pytest.raises(UpstreamError) as info:
        await decode(chunks, max_event_bytes=1_000)
    assert info.value.message == "The upstream MCP server sent an oversized event"
    assert info.value.status == 502


async def test_oversized_event_made_of_many_lines() -> None:
    data = b"data: aaaaaaaaaa\n" * 200 + b"\n"
    with pytest.raises(UpstreamError):
        await decode([data[i : i + 13] for i in range(0, len(data), 13)], max_event_bytes=1_000)


async def test_endless_line_without_newline_is_an_upstream_error() -> None:
    chunks = [b"data: "] + [b"y" * 100] * 50
    with pytest.raises(UpstreamError):
        await decode(chunks, max_event_bytes=1_000)


async def test_events_just_under_the_limit_and_many_of_them_pass() -> None:
    data = (b"data: " + b"z" * 900 + b"\n\n") * 50
    items = await decode([data[i : i + 333] for i in range(0, len(data), 333)], max_event_bytes=1_000)
    assert items == [Event(data="z" * 900)] * 50


# --- encode_event -------------------------------------------------------------------------------------


def test_encode_event_format() -> None:
    assert encode_event(b'{"a":1}', "5", 100) == b'id: 5\nretry: 100\nevent: message\ndata: {"a":1}\n\n'
    assert encode_event("a\nb") == b"event: message\ndata: a\ndata: b\n\n"
    assert encode_event("", "3") == b"id: 3\ndata: \n\n"  # a priming event, as the SDKs write it
    assert encode_event("", "3", 250) == b"id: 3\nretry: 250\ndata: \n\n"
    assert encode_event("", None) == b"\n"
    assert KEEPALIVE_BYTES.startswith(b":")


@pytest.mark.parametrize(
    ("data", "event_id", "retry"),
    [
        (dumps({"jsonrpc": "2.0", "id": 1, "result": {"text": "line1\nline2 \u00e9"}}), "17", None),
        ("multi\nline\n\ndata", None, 2000),
        ("trailing newline\n", "x", None),
        ("  spaces  ", None, None),
        (": looks like a comment", None, None),
        ("data: looks like a field", "1", 5),
    ],
)
async def test_encode_event_round_trips_through_read_events(
    data: bytes | str, event_id: str | None, retry: int | None
) -> None:
    text = data.decode() if isinstance(data, bytes) else data
    decoded = await decode_every_way(encode_event(data, event_id, retry))
    assert decoded == [Event(data=text, event="message", id=event_id or "", retry=retry)]
    if isinstance(data, bytes):
        assert isinstance(decoded[0], Event) and json.loads(decoded[0].data) == json.loads(data)


async def test_encode_event_with_a_bare_cr_round_trips() -> None:
    decoded = await decode([encode_event("a\rid: 9")])
    # SSE cannot carry a bare CR in data (it ends a line); what matters is that it forges no field.
    assert decoded == [Event(data="a\nid: 9")]
