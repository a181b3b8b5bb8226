"""Structural bounds of a JSON text, checked before it is parsed, at a cost proportional to what
is accepted: how many members and elements it has in all, and how deeply it nests.

A refused request must not cost the proxy what an accepted one does: parsing 4 MB of small
members takes a strict JSON parser a quarter of a second, during which no other tenant is served.
Everything here runs at C speed (bytes.count, re, translate), never a Python step per token:
- counting the structural characters of the raw bytes gives upper bounds; when they are within
  the bounds nothing else is done;
- otherwise strings are cut out window by window and the separators left are counted, stopping at
  the first window that crosses the members bound (so a refusal reads about `max_members` worth);
- depth is judged on the brackets alone, by regular expressions that match balanced groups of a
  bounded depth (brackets that cannot be JSON, a value right after a closed one, are refused
  first: in JSON a comma stands between them, which the members bound counts).
"""

from __future__ import annotations

import functools
import re
from typing import Final

from proxy.protocol.errors import ParseError

_STRING: Final = re.compile(rb'"[^"]*"')  # once escaped backslashes and quotes are gone
_WINDOW: Final = 64 * 1024
_BRACKETS_ONLY: Final = bytes.maketrans(b"{}", b"[]")
_NOT_SHAPE: Final = bytes(set(range(256)) - set(b"[]{},"))
_STEP: Final = 64  # depth one group pattern spans (deeper bounds are checked a step at a time)


def check_structure(raw: bytes, max_members: int, max_depth: int) -> int:
    """ParseError when `raw` has more than `max_members` members and elements in all, or nests
    deeper than `max_depth`; nothing else is judged here (the parser judges the syntax). Returns
    the members and elements counted: exactly, or an upper bound when that alone was within bounds."""
    separators = raw.count(b":") + raw.count(b",")
    if separators <= max_members and raw.count(b"[") + raw.count(b"{") <= max_depth:
        return separators  # the characters alone cannot add up to more, wherever they stand
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    members, bare = _members(text, max_members)
    if bare.count(b"[") + bare.count(b"{") > max_depth:
        shape = bare.translate(_BRACKETS_ONLY, _NOT_SHAPE)
        if b"][" in shape:  # in JSON only a comma may follow a closed array or object, then a value
            raise ParseError("Parse error: a JSON value follows a closed array or object without a comma")
        brackets = shape.replace(b",", b"")
        if brackets.count(b"[") == brackets.count(b"]") and _deeper_than(brackets, max_depth):
            raise ParseError(f"Parse error: the JSON is nested deeper than {max_depth} levels")
    return members


def _members(text: bytes, max_members: int) -> tuple[int, bytes]:
    """The separators outside strings (ParseError past `max_members`), and the text without its
    strings. Each window ends outside a string: where its quotes pair up."""
    members, start, parts = 0, 0, []
    while start < len(text):
        end = min(start + _WINDOW, len(text))
        window = text[start:end]
        if window.count(b'"') % 2 and end < len(text):  # the window ends inside a string
            closing = text.find(b'"', end)
            end = len(text) if closing < 0 else closing + 1
            window = text[start:end]
        bare = _STRING.sub(b"", window)
        members += bare.count(b":") + bare.count(b",")
        if members > max_members:
            raise ParseError(f"Parse error: the JSON has more than {max_members} members and elements")
        parts.append(bare)
        start = end
    return members, b"".join(parts)


@functools.lru_cache(maxsize=_STEP + 1)
def _groups(depth: int) -> re.Pattern[bytes]:
    """Any run of balanced bracket groups nested at most `depth` deep. Possessive: the match never
    backtracks, so it costs one pass over the brackets."""
    pattern = b""
    for _ in range(depth):
        pattern = rb"(?:\[" + pattern + rb"\])*+"
    return re.compile(pattern)


@functools.lru_cache(maxsize=1)
def _deepest_groups() -> re.Pattern[bytes]:
    """One balanced group at most _STEP deep (removing every such group makes the rest _STEP
    levels shallower)."""
    return re.compile(rb"\[" + _groups(_STEP - 1).pattern + rb"\]")


def _deeper_than(brackets: bytes, limit: int) -> bool:
    """Whether balanced `brackets` (only [ and ]) nest deeper than `limit`."""
    while limit > _STEP and brackets:
        brackets = _deepest_groups().sub(b"", brackets)
        limit -= _STEP
    return _groups(limit).fullmatch(brackets) is None
