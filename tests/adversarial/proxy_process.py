"""The proxy as operators run it: `python -m proxy run --config FILE` in a process of its own.

For the tests that need what only a real process shows: its resident memory (/proc/PID/status)
and its log lines exactly as they reach stderr (written to a file, so a full pipe can never stall
the proxy's event loop).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import RunningProxy, proxy_config
from tests.factories import DEV_SECRET, DEV_SECRET_ENV, RsaKeys
from tests.upstreams import free_port

ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class ProxyProcess:
    """A running `proxy run` process; `client` talks to it like the in-process RunningProxy does."""

    config_path: Path
    stderr_path: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    client: RunningProxy = field(init=False)

    def __post_init__(self) -> None:
        self.client = RunningProxy(self.url, None, None)  # type: ignore[arg-type]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, log_level: str = "debug", timeout: float = 30.0, log_format: str = "auto") -> None:
        with self.stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "--config", str(self.config_path),
                 "--log-level", log_level, "--log-format", log_format],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                env={**os.environ, DEV_SECRET_ENV: DEV_SECRET},
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.process.returncode}: {self.stderr_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if sock.recv(64).startswith(b"HTTP/1.1 200"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("proxy did not start serving")
            time.sleep(0.05)

    def status(self, field_name: str) -> int:
        """A /proc/PID/status field in kB (VmRSS: resident memory now, VmHWM: its peak)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field_name}:"):
                return int(line.split()[1])
        raise KeyError(field_name)

    def rss_kb(self) -> int:
        return self.status("VmRSS")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (drain and exit) and the exit code; SIGKILL if it does not exit in time."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def stderr_text(self) -> str:
        return self.stderr_path.read_bytes().decode("utf-8", "replace")


def write_proxy_config(
    tmp: Path,
    upstreams: dict[str, Any],
    rsa: RsaKeys,
    policies: dict[str, dict[str, Any]] | None = None,
    **overrides: Any,
) -> ProxyProcess:
    """A config file for a proxy on a free port (as conftest's make_proxy builds it), not started."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    data = proxy_config(url, upstreams, tmp, rsa, **overrides)
    if policies:
        policy_dir = tmp / "policies"
        policy_dir.mkdir(exist_ok=True)
        data["policies_dir"] = str(policy_dir)
        for tenant, policy in policies.items():
            (policy_dir / f"{tenant}.yaml").write_text(yaml.safe_dump(policy))
            data["tenants"][tenant]["policy"] = tenant
    config_path = tmp / "proxy.yaml"
    config_path.write_text(yaml.safe_dump(json.loads(json.dumps(data))))
    return ProxyProcess(config_path, tmp / "proxy.stderr", port)
