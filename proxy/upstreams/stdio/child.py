"""One stdio MCP server process: newline-delimited JSON-RPC on its stdin and stdout.

The child gets exactly the environment the config gives it (`env`, and the variables
`inherit_env` names; never the rest of the proxy's own, which holds secrets such as JWT keys), its
argv[0] resolved once at start, and its resource limits (address space, CPU time, open files:
`upstream.limits`) set in the child itself before it runs the command. Lines are bounded in length,
stderr is logged with the tenant attached and rate-limited, and stopping closes stdin, then
terminates, then kills: no child outlives the proxy's shutdown.

A child that cannot be started, or exits before it has said anything, is the commonest first-hour
problem (`npx` or `uvx` without PATH or HOME): it is logged at warning with the program, the exit
code or errno and its last stderr lines, and its requests fail with a message saying what to check.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import resource
import shutil
import signal
import subprocess
import time
from collections import deque
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
STDERR_TAIL_LINES: Final = 10  # kept for the warning when a child dies before saying anything
STOP_GRACE_SECONDS: Final = 2.0
CPU_KILL_AFTER_SECONDS: Final = 5  # past its CPU time a child gets SIGXCPU, this much later SIGKILL
STDERR_DRAIN_SECONDS: Final = 1.0  # a grandchild may hold the pipe open: wait this long at most
ENVIRONMENT_HINT: Final = (
    "the child's environment is empty unless upstream.env or upstream.inherit_env set it "
    "(npx and uvx need PATH and HOME)"
)
_EXIT_MEANINGS: Final = {126: "command not executable", 127: "command not found"}

MessageHandler = Callable[[JsonObject], None]


def exit_description(returncode: int | None) -> str:
    """`exit 127: command not found`, `killed by SIGKILL`: how a child ended, for people."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    meaning = _EXIT_MEANINGS.get(returncode)
    return f"exit {returncode}: {meaning}" if meaning else f"exit {returncode}"


class StartFailed(UpstreamError):
    """The program could not be run, or ended before it answered anything. The client is told
    what to check; its stderr (the upstream's own words) stays in the proxy's log."""

    def __init__(self, what: str, stderr_tail: Sequence[str] = (), exited: bool = True) -> None:
        hint = f": {ENVIRONMENT_HINT}; its stderr is in the proxy's log" if exited else ""
        super().__init__(f"The stdio MCP server could not start ({what}){hint}")
        self.what = what
        self.stderr_tail = list(stderr_tail)
        self.hint = ENVIRONMENT_HINT if exited else None

    def explained(self) -> str:
        """For the operator (`check-config --probe`): with its last stderr line."""
        last = next((line for line in reversed(self.stderr_tail) if line.strip()), None)
        said = f"; its stderr ends: {last}" if last else ""
        hint = f"; {self.hint}" if self.hint else ""
        return f"could not start ({self.what}){said}{hint}"


def resolve_argv(argv: Sequence[str]) -> list[str]:
    """argv with its program resolved against the proxy's PATH (what the child gets is its own)."""
    program = argv[0]
    if "/" not in program:
        found = shutil.which(program)
        if found is None:
            raise StartFailed(f"{program}: not found on the proxy's PATH", exited=False)
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
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.spoke = False  # it has written at least one JSON-RPC message
        self.stopping = False  # the proxy asked it to stop: its exit is no failure
        self.exited = asyncio.Event()
        self.finished = asyncio.Event()  # exited, its stderr read to the end, on_exit called

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.returncode is None and not self.exited.is_set()

    @property
    def program(self) -> str:
        return self._argv[0]

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process is not None else None

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
        except StartFailed as failure:
            log.warning("stdio_start_failed", tenant=self.tenant, program=self.program, reason=failure.what)
            raise
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, "error")
            what = f"{name}: {exc.strerror or exc}"
            log.warning("stdio_start_failed", tenant=self.tenant, program=self.program, errno=name,
                        reason=exc.strerror or str(exc), cwd=self._cwd and str(self._cwd))  # fmt: skip
            raise StartFailed(what, exited=False) from exc
        except subprocess.SubprocessError as exc:  # the limits could not be set in the child
            log.warning("stdio_start_failed", tenant=self.tenant, program=self.program, reason=str(exc))
            raise StartFailed(f"the child could not be prepared: {exc}", exited=False) from exc
        log.info("stdio_started", tenant=self.tenant, pid=self._process.pid)
        self._tasks = [
            asyncio.create_task(self._read_stdout(), name=f"stdio-out-{self.tenant}"),
            asyncio.create_task(self._read_stderr(), name=f"stdio-err-{self.tenant}"),
        ]

    def failure(self) -> UpstreamError:
        """What requests on this (exited) child fail with: the start failure when it never spoke."""
        if self.stopping:
            return UpstreamError("The upstream MCP server process exited")
        if not self.spoke:
            return StartFailed(exit_description(self.returncode), self.stderr_tail)
        return UpstreamError(f"The upstream MCP server process exited ({exit_description(self.returncode)})")

    async def _ended(self, otherwise: str) -> UpstreamError:
        """The child is exiting: how it ended, once that is known (soon), else `otherwise`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.finished.wait(), STOP_GRACE_SECONDS + STDERR_DRAIN_SECONDS)
        return self.failure() if self.finished.is_set() else UpstreamError(otherwise)

    async def send(self, message: JsonObject) -> None:
        process = self._process
        if process is None or process.stdin is None:
            raise UpstreamError("The stdio MCP server is not running")
        if not self.alive:
            raise await self._ended("The stdio MCP server is not running")
        line = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
        try:
            async with self._write_lock:
                process.stdin.write(line + b"\n")
                await process.stdin.drain()
        except (ConnectionError, RuntimeError) as exc:
            raise await self._ended("The stdio MCP server closed its input") from exc

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
                    self.spoke = True
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
            text = line.decode("utf-8", "replace").rstrip()[:MAX_STDERR_CHARS]
            self.stderr_tail.append(text)
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
                log.info("stdio_stderr", tenant=self.tenant, pid=self.pid, line=text)

    async def _finish(self) -> None:
        if self.exited.is_set():
            return
        self.exited.set()
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), STOP_GRACE_SECONDS)
        if not self.stopping and len(self._tasks) > 1:  # its last words explain the exit: read them
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._tasks[1]), STDERR_DRAIN_SECONDS)
        returncode = self.returncode
        if self.stopping:
            log.info("stdio_exited", tenant=self.tenant, pid=self.pid, returncode=returncode)
        else:
            log.warning(
                "stdio_start_failed" if not self.spoke else "stdio_exited",
                tenant=self.tenant,
                pid=self.pid,
                program=self.program,
                returncode=returncode,
                exit=exit_description(returncode),
                stderr_tail=list(self.stderr_tail),
                hint=ENVIRONMENT_HINT if not self.spoke else None,
            )
        self._on_exit(self)
        self.finished.set()

    async def stop(self) -> None:
        """Close stdin (the stdio way to ask a server to exit), then terminate, then kill."""
        self.stopping = True
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
                except asyncio.CancelledError:  # stopped in a hurry (the proxy's exit): never left running
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    raise
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.exited.set()
