"""The JSON log writer: orjson lines, one write per event-loop turn."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import orjson
import pytest
import structlog

from proxy.ops.log import MAX_VALUE_CHARS, BatchedBytesLogger, BoundedJSONLines, SafeValues, ascii_json


class CountingFile(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: Any) -> int:
        self.writes += 1
        return super().write(data)


def test_lines_of_one_loop_turn_leave_in_one_write() -> None:
    file = CountingFile()
    logger = BatchedBytesLogger(file)

    async def main() -> None:
        for n in range(3):
            logger.info(ascii_json({"event": "e", "n": n}))
        assert file.writes == 0  # nothing written before the turn ends
        await asyncio.sleep(0)
        assert file.writes == 1
        logger.info(ascii_json({"event": "e", "n": 3}))
        await asyncio.sleep(0)

    asyncio.run(main())
    assert file.writes == 2
    assert [json.loads(line)["n"] for line in file.getvalue().splitlines()] == [0, 1, 2, 3]


def test_outside_a_loop_a_line_is_written_at_once() -> None:
    file = CountingFile()
    BatchedBytesLogger(file).info(b'{"event":"x"}')
    assert file.getvalue() == b'{"event":"x"}\n'


def test_a_closed_stderr_does_not_raise() -> None:
    file = CountingFile()
    file.close()
    BatchedBytesLogger(file).info(b'{"event":"x"}')  # ValueError from the closed file is swallowed
    assert file.writes == 1


def test_render_escapes_line_breaks_and_survives_what_orjson_refuses() -> None:
    line = ascii_json({"event": "e", "s": "a\nb\u2028", "big": 2**70, "lone": "\ud800", "obj": object()})
    assert b"\n" not in line
    parsed = json.loads(line)
    assert parsed["s"] == "a\nb\u2028" and parsed["big"] == 2**70 and parsed["lone"] == "\ud800"


def test_structlog_renders_through_the_batched_writer() -> None:
    file = CountingFile()
    structlog.configure(
        processors=[structlog.processors.JSONRenderer(serializer=ascii_json)],
        logger_factory=lambda *args: BatchedBytesLogger(file),
        cache_logger_on_first_use=False,
    )
    try:
        structlog.get_logger().info("mcp_request", tenant="acme")
    finally:
        structlog.reset_defaults()
    assert json.loads(file.getvalue()) == {"event": "mcp_request", "tenant": "acme"}


@pytest.mark.parametrize("breaker", ["\u2028", "\u2029", "\x85", "\r", "\n", "\x0b", "\x1e"])
def test_no_string_can_break_a_log_line_for_any_reader(breaker: str) -> None:
    forged = f'x{breaker}{{"event":"forged","tenant":"globex"}}'
    line = ascii_json({"event": "mcp_request", "method": forged, "name": "caf\u00e9"})
    assert line.isascii()
    assert len(line.decode("ascii").splitlines()) == 1
    assert json.loads(line)["method"] == forged


TERMINAL_AND_LINE_BREAKERS = ["\x1b", "\x07", "\x00", "\x7f", "\x85", "\x9b", "\r", "\n", "\u2028", "\u2029"]


@pytest.mark.parametrize("char", TERMINAL_AND_LINE_BREAKERS)
def test_console_values_are_escaped_to_printable_ascii(char: str) -> None:
    event = SafeValues(escape=True)(None, "info", {"event": "mcp_request", "method": f"a{char}b\ua78ac"})
    assert event["method"].isascii() and event["method"].isprintable()
    assert event["method"].startswith("a\\") and event["method"].endswith("b\\ua78ac")


def test_long_values_are_cut_in_both_formats_and_json_values_stay_as_they_were() -> None:
    long = "x" * (MAX_VALUE_CHARS + 500)
    for escape in (True, False):
        event = SafeValues(escape)(None, "info", {"event": "e", "path": long, "n": 3})
        assert event["path"] == "x" * MAX_VALUE_CHARS + "...(+500 chars)" and event["n"] == 3
    kept = SafeValues(escape=False)(None, "info", {"event": "e", "method": "a\x1bb\u2028"})
    assert kept["method"] == "a\x1bb\u2028"  # JSON escapes it itself (ascii_json), losslessly


def test_json_lines_bound_long_values_and_render_the_rest_as_they_are() -> None:
    render = BoundedJSONLines()
    short = {"event": "mcp_request", "method": "tools/call", "n": 3}
    assert render(None, "info", dict(short)) == ascii_json(short)
    many = {"event": "e", **{f"k{i}": "v" * 100 for i in range(20)}}  # a long line of short values
    assert orjson.loads(render(None, "info", dict(many))) == many
    long = "\u2028" * (MAX_VALUE_CHARS + 1)  # (each takes six bytes of the line)
    line = render(None, "info", {"event": "e", "path": long, "n": 3})
    assert line.isascii() and b"\n" not in line
    assert orjson.loads(line) == {"event": "e", "path": "\u2028" * MAX_VALUE_CHARS + "...(+1 chars)", "n": 3}


def test_a_traceback_keeps_its_lines_on_the_console() -> None:
    event = SafeValues(escape=True)(None, "error", {"event": "e", "exception": "Traceback\n  x\x1b[2J\n"})
    assert event["exception"] == "Traceback\n  x\\x1b[2J\n"
