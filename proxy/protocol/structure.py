"""Structural bounds of a JSON text, checked before it is parsed, at a cost proportional to what
is accepted: how many members and elements it has in all, and how deeply it nests.

A refused request must not cost the proxy what an accepted one does: parsing 4 MB of small
members takes a strict JSON parser a quarter of a second, during which no other tenant is served.
Counting the structural characters of the raw bytes is C-speed; when those counts could exceed
the bounds, the text is tokenized (strings skipped whole) only until a bound is crossed.
"""

from __future__ import annotations

import re
from typing import Final

from proxy.protocol.errors import ParseError

# A JSON string once its escaped backslashes and quotes are gone: no quote inside it any more.
_TOKENS: Final = re.compile(rb'"[^"]*"|[:,\[\]{}]')
_QUOTE, _COLON, _COMMA, _OPEN_LIST, _OPEN_OBJECT = 34, 58, 44, 91, 123


def check_structure(raw: bytes, max_members: int, max_depth: int) -> int:
    """ParseError when `raw` has more than `max_members` members and elements in all, or nests
    deeper than `max_depth`; nothing else is judged here (the parser judges the syntax). Returns
    the members and elements counted: exactly, or an upper bound when that alone was within bounds."""
    separators = raw.count(b":") + raw.count(b",")
    if separators <= max_members and raw.count(b"[") + raw.count(b"{") <= max_depth:
        return separators  # the characters alone cannot add up to more, wherever they stand
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    members = depth = 0
    for token in _TOKENS.finditer(text):
        first = token.group()[0]
        if first == _QUOTE:
            continue
        if first in (_COLON, _COMMA):
            members += 1
            if members > max_members:
                raise ParseError(f"Parse error: the JSON has more than {max_members} members and elements")
        elif first in (_OPEN_LIST, _OPEN_OBJECT):
            depth += 1
            if depth > max_depth:
                raise ParseError(f"Parse error: the JSON is nested deeper than {max_depth} levels")
        else:
            depth -= 1
    return members
