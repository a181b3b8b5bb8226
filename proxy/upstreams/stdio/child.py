"""One stdio MCP server process: newline-delimited JSON-RPC on its stdin and stdout.

The child gets exactly the environment the config gives it (never the proxy's own, which holds
secrets such as JWT keys), its argv[0] resolved once at start, and its resource limits (address
space, CPU time, open files: `upstream.limits`) set in the child itself before it runs the command.
Lines are bounded in length, stderr is logged with the tenant attached and rate-limited, and
stopping closes stdin, then terminates, then kills: no child outlives the proxy's shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import structlog

from proxy.config import ChildLimits
from proxy.protocol.errors import UpstreamError
from proxy.types import JsonObject

log = structlog.get_logger("proxy.upstreams.stdio")

MAX_LINE_BYTES: Final = 16 * 1024 * 1024
MAX_STDERR_CHARS: Final = 2000
STDERR_LINES_PER_SECOND: Final = 20
STOP_GRACE_SECONDS: Final = 2.0
CPU_KILL_AFTER_SECONDS: Final = 5  # past its CPU time a child gets SIGXCPU, this much later SIGKILL

MessageHandler = Callable[[JsonObject], None]


def resolve_argv(argv: Sequence[str]) -> list[str]:
    """argv with its program resolved against the proxy's PATH (the child itself gets no PATH)."""
    program = argv[0]
    if "/" not in program:
        found = shutil.which(program)
        if found is None:
            raise UpstreamError(f"The stdio MCP server program {program!r} was not found")
        program = found
    return [program, *argv[1:]]


def rlimits(limits: ChildLimits) -> Callable[[], None]:
    """What runs in the child between fork and exec: its limits, worked out here beforehand (the
    child only makes the calls) and never above the proxy's own hard limits, which an unprivileged
    process cannot raise."""
    wanted = [
        (resource.RLIMIT_AS, limits.memory_bytes, 0),
        (resource.RLIMIT_CPU, limits.cpu_seconds, CPU_KILL_AFTER_SECONDS),
        (resource.RLIMIT_NOFILE, limits.open_files, 0),
    ]
    settings = []
    for which, value, grace in wanted:
        if value:
            _, hard = resource.getrlimit(which)
            ceiling = value + grace if hard == resource.RLIM_INFINITY else min(value + grace, hard)
            settings.append((which, (min(value, ceiling), ceiling)))

    def apply() -> None:
        for which, pair in settings:
            resource.setrlimit(which, pair)

    return apply


class Child:
    def __init__(
        self,
        tenant: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: Path | None,
        on_message: MessageHandler,
        on_exit: Callable[[Child], None],
        limits: ChildLimits | None = None,
    ) -> None:
        self.tenant = tenant
        self._limits = rlimits(limits or ChildLimits())
        self._argv = list(argv)
        self._env = dict(env)
        self._cwd = cwd
        self._on_message = on_message
        self._on_exit = on_exit
        self._process: asyncio.subprocess.Process | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._write_lock = asyncio.Lock()
        self._stderr_window = (0.0, 0)
        self.exited = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.returncode is None and not self.exited.is_set()

    async def start(self) -> None:
        try:
            self._process = await asyncio.create_subprocess_exec(
                *resolve_argv(self._argv),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env,
                cwd=self._cwd,
                limit=MAX_LINE_BYTES,
                preexec_fn=self._limits,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise UpstreamError("The stdio MCP server could not be started") from exc
        log.info("stdio_started", tenant=self.tenant, pid=self._process.pid)
        self._tasks = [
            asyncio.create_task(self._read_stdout(), name=f"stdio-out-{self.tenant}"),
            asyncio.create_task(self._read_stderr(), name=f"stdio-err-{self.tenant}"),
        ]

    async def send(self, message: JsonObject) -> None:
        process = self._process
        if process is None or process.stdin is None or not self.alive:
            raise UpstreamError("The stdio MCP server is not running")
        line = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
        try:
            async with self._write_lock:
                process.stdin.write(line + b"\n")
                await process.stdin.drain()
        except (ConnectionError, RuntimeError) as exc:
            raise UpstreamError("The stdio MCP server closed its input") from exc

    async def _read_stdout(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        stdout = self._process.stdout
        try:
            while True:
                try:
                    line = await stdout.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    log.warning("stdio_line_too_long", tenant=self.tenant, pid=self.pid, limit=MAX_LINE_BYTES)
                    break
                if not line:
                    break
                message = self._parse(line)
                if message is not None:
                    self._on_message(message)
        finally:
            await self._finish()

    def _parse(self, line: bytes) -> JsonObject | None:
        try:
            message: Any = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            log.warning("stdio_garbage_line", tenant=self.tenant, pid=self.pid, bytes=len(line))
            return None
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
            log.warning("stdio_not_jsonrpc", tenant=self.tenant, pid=self.pid)
            return None
        return message

    async def _read_stderr(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        stderr = self._process.stderr
        while True:
            try:
                line = await stderr.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue
            if not line:
                return
            now = time.monotonic()
            start, count = self._stderr_window
            if now - start >= 1.0:
                if count > STDERR_LINES_PER_SECOND:
                    log.warning("stdio_stderr_suppressed", tenant=self.tenant, pid=self.pid,
                                lines=count - STDERR_LINES_PER_SECOND)  # fmt: skip
                start, count = now, 0
            count += 1
            self._stderr_window = (start, count)
            if count <= STDERR_LINES_PER_SECOND:
                text = line.decode("utf-8", "replace").rstrip()[:MAX_STDERR_CHARS]
                log.info("stdio_stderr", tenant=self.tenant, pid=self.pid, line=text)

    async def _finish(self) -> None:
        if self.exited.is_set():
            return
        self.exited.set()
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), STOP_GRACE_SECONDS)
        log.info("stdio_exited", tenant=self.tenant, pid=self.pid,
                 returncode=process.returncode if process is not None else None)  # fmt: skip
        self._on_exit(self)

    async def stop(self) -> None:
        """Close stdin (the stdio way to ask a server to exit), then terminate, then kill."""
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            if process.stdin is not None:
                with contextlib.suppress(Exception):
                    process.stdin.close()
            for signal_step in (None, process.terminate, process.kill):
                if signal_step is not None:
                    with contextlib.suppress(ProcessLookupError):
                        signal_step()
                try:
                    await asyncio.wait_for(process.wait(), STOP_GRACE_SECONDS)
                    break
                except TimeoutError:
                    continue
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.exited.set()
