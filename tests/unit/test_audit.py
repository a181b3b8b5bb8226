"""The audit trail without sockets: per-tenant files, summaries only, unforgeable lines, rotation."""

from __future__ import annotations

import json
import logging.handlers
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.layers.containment.audit import AuditLog, summarize
from proxy.layers.containment.request_state import RequestState, RequestStateSeal
from proxy.types import Era, TenantContext
from tests.factories import make_config, make_exchange, make_request


def exchange(tenant: str, body: dict[str, Any], **fields: Any) -> Any:
    ex = make_request(make_config(), tenant, body, Era.MODERN)
    for name, value in fields.items():
        setattr(ex, name, value)
    return ex


def call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments},
    }


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_are_summaries_in_the_tenants_own_file(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path, 1 << 20, 2)
    ex = exchange("acme", call("add_note", {"text": "SECRET-VALUE", "tenant_id": "acme"}))
    ex.record_result(b'{"content":[{"type":"text","text":"CANARY-acme"}]}')
    audit.record(ex)
    audit.record(exchange("globex", call("list_notes", {})))
    audit.record(
        exchange(
            "acme",
            {"jsonrpc": "2.0", "id": 2, "method": "resources/read", "params": {"uri": "notes://acme/x"}},
        )
    )
    audit.flush()
    acme = lines(tmp_path / "acme.jsonl")
    assert [r["method"] for r in acme] == ["tools/call", "resources/read"]
    first = acme[0]
    assert set(first) >= {
        "ts", "tenant", "subject", "session", "method", "name", "argument_keys", "outcome", "cache",
        "result_bytes", "result_sha256", "duration_ms",
    }  # fmt: skip
    assert (first["tenant"], first["subject"], first["name"]) == ("acme", "alice", "add_note")
    assert first["argument_keys"] == ["text", "tenant_id"]
    assert first["result_bytes"] == len(b'{"content":[{"type":"text","text":"CANARY-acme"}]}')
    assert len(first["result_sha256"]) == 64
    text = (tmp_path / "acme.jsonl").read_text()
    assert "SECRET-VALUE" not in text
    assert "CANARY" not in text
    assert "globex" not in text
    assert [r["tenant"] for r in lines(tmp_path / "globex.jsonl")] == ["globex"]
    audit.close()


@pytest.mark.parametrize(
    "evil",
    ['x\n{"tenant":"globex","outcome":"ok"}', 'x"}\n{"forged":true', "x\r\u2028\x00\x1b[31m", "\ud800"],
)
def test_names_and_keys_cannot_forge_lines(tmp_path: Path, evil: str) -> None:
    audit = AuditLog(tmp_path, 1 << 20, 2)
    audit.record(exchange("acme", call(evil, {evil: 1})))
    audit.flush()
    records = lines(tmp_path / "acme.jsonl")
    assert len(records) == 1
    assert records[0]["tenant"] == "acme"
    assert records[0]["name"] == evil
    assert records[0]["argument_keys"] == [evil]
    audit.close()


def test_files_rotate_by_size_and_keep_a_bounded_number(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path, max_file_bytes=2048, backups=2)
    for index in range(100):
        audit.record(exchange("acme", call(f"tool-{index}", {})))
    audit.flush()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["acme.jsonl", "acme.jsonl.1", "acme.jsonl.2"]
    for path in tmp_path.iterdir():
        assert path.stat().st_size <= 2048 + 512
        assert path.stat().st_mode & 0o777 == 0o600, f"{path.name} is readable by others after rotation"
    assert lines(tmp_path / "acme.jsonl")[-1]["name"] == "tool-99"
    audit.close()


def test_a_rollover_that_failed_to_reopen_does_not_end_the_trail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = AuditLog(tmp_path, max_file_bytes=2048, backups=2)
    audit.record(exchange("acme", call("first", {})))
    audit.flush()
    real_open = logging.handlers.RotatingFileHandler._open
    failures = iter([OSError(24, "Too many open files")])

    def open_once_failing(handler: logging.handlers.RotatingFileHandler) -> Any:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return real_open(handler)

    monkeypatch.setattr(logging.handlers.RotatingFileHandler, "_open", open_once_failing)
    for index in range(40):  # enough to rotate: the reopening after it fails once
        audit.record(exchange("acme", call(f"tool-{index}", {})))
    audit.flush()
    audit.record(exchange("acme", call("after-the-failure", {})))
    audit.flush()
    assert lines(tmp_path / "acme.jsonl")[-1]["name"] == "after-the-failure"
    assert (tmp_path / "acme.jsonl").stat().st_mode & 0o777 == 0o600
    audit.close()


def test_an_audit_path_that_is_a_fifo_is_written_not_rotated(tmp_path: Path) -> None:
    fifo = tmp_path / "acme.jsonl"
    os.mkfifo(fifo, 0o600)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    audit = AuditLog(tmp_path, max_file_bytes=1024, backups=2)
    for index in range(20):
        audit.record(exchange("acme", call(f"tool-{index}", {})))
    audit.flush()
    audit.close()
    reader.join(timeout=5)
    names = [json.loads(line)["name"] for line in b"".join(received).decode().splitlines()]
    assert names == [f"tool-{index}" for index in range(20)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acme.jsonl"]


def test_existing_files_are_appended_to(tmp_path: Path) -> None:
    (tmp_path / "acme.jsonl").write_text('{"earlier":true}\n')
    audit = AuditLog(tmp_path, 1 << 20, 2)
    audit.record(exchange("acme", call("t", {})))
    audit.flush()
    records = lines(tmp_path / "acme.jsonl")
    assert records[0] == {"earlier": True}
    assert records[1]["name"] == "t"
    audit.close()


async def test_recent_is_per_tenant_and_newest_first() -> None:
    audit = AuditLog(None, 1 << 20, 2)
    for index in range(5):
        audit.record(exchange("acme", call(f"a{index}", {})))
        audit.record(exchange("globex", call(f"g{index}", {})))
    assert [r["name"] for r in await audit.recent("acme", 3)] == ["a4", "a3", "a2"]
    assert all(r["tenant"] == "acme" for r in await audit.recent("acme", 50))
    assert await audit.recent("initech", 5) == []


def test_no_tenant_no_record() -> None:
    ex = make_exchange(make_config())
    assert summarize(ex) is None


def _caller(tenant: str = "acme", subject: str = "alice", issuer: str = "dev") -> TenantContext:
    return TenantContext(tenant, subject, issuer, frozenset(), 0.0)


def test_request_state_is_bound_to_its_caller_request_and_lifetime() -> None:
    seal = RequestStateSeal()
    state = RequestState("tools/call", "book", "upstream-state-1", ("confirm",), {"roots": {"roots": []}})
    sealed = seal.seal(_caller(), state)
    assert "upstream-state-1" not in sealed
    assert seal.open(_caller(), "tools/call", "book", sealed) == state
    assert seal.open(_caller("globex"), "tools/call", "book", sealed) is None
    assert seal.open(_caller(subject="bob"), "tools/call", "book", sealed) is None
    assert (
        seal.open(_caller(issuer="other-idp"), "tools/call", "book", sealed) is None
    )  # same sub, other issuer
    assert seal.open(_caller(), "tools/call", "cancel_booking", sealed) is None  # another request
    assert seal.open(_caller(), "prompts/get", "book", sealed) is None
    assert seal.open(_caller(), "tools/call", "book", sealed, now=time.time() + seal.ttl_seconds + 1) is None
    assert seal.open(_caller(), "tools/call", "book", sealed[:-2] + "AA") is None
    assert seal.open(_caller(), "tools/call", "book", "upstream-state-1") is None
    assert seal.open(_caller(), "tools/call", "book", "mtp2.a.b.c") is None
    assert seal.open(_caller(), "tools/call", "book", 7) is None
    assert RequestStateSeal().open(_caller(), "tools/call", "book", sealed) is None  # another proxy's key
