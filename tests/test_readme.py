"""README's first hour, followed as a newcomer would: its install line in a fresh copy of the
repository, then every command of "Running it", pasted as they are, ending in a tool result.

The commands are read from README.md itself, so the page cannot drift from what works. Two things
are changed so that this test never collides with anything else listening on the machine: port 8080
becomes a free port, in the commands and in the copied config.example.yaml alike, and the copy's
metrics listener (default 127.0.0.1:9464, which no command here reads) takes a free port too.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.upstreams import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
# What the test's own environment holds that a newcomer's shell does not.
NOT_IN_A_NEW_SHELL = ("VIRTUAL_ENV", "MCP_PROXY_DEV_SECRET", "MCP_TOKEN", "PYTHONPATH")


def shell_blocks(section: str) -> list[str]:
    """The ```sh blocks of one `## section` of README.md."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```sh\n(.*?)```", text[start : end if end > 0 else None], re.DOTALL)


def copy_of_the_repository(target: Path) -> Path:
    """The repository's files (tracked and new, not ignored) as a fresh clone would have them."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.mark.timeout(900)  # a new venv and the demo: about a minute, several on a loaded machine
def test_running_it_works_when_pasted_after_the_install_line(tmp_path: Path) -> None:
    install = shell_blocks("Fresh machine: two commands")[0]
    running = shell_blocks("Running it")[0]
    assert ".venv" in install and "run --config config.example.yaml" in running
    repo = copy_of_the_repository(tmp_path / "repo")
    port = str(free_port())
    example = repo / "config.example.yaml"
    metrics = f"\nmetrics: {{listen: {{host: 127.0.0.1, port: {free_port()}}}}}\n"
    example.write_text(example.read_text().replace("8080", port) + metrics)
    script = "set -e\n" + install + running.replace("8080", port)
    test_venv = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != test_venv)
    env = {k: v for k, v in os.environ.items() if k not in NOT_IN_A_NEW_SHELL} | {"PATH": path}
    process = subprocess.Popen(
        ["bash", "-c", script], cwd=repo, env=env, start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=840)  # pip install in a new venv: most of it
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever the commands left running
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, f"{stdout}\n{stderr[-6000:]}"
    assert "all isolation checks passed" in stdout  # the install line's demo
    assert '"status": "ready"' in stdout  # /readyz
    assert '{"server_tenant": "acme", "canary": "acme-notes"' in stdout  # the tool result


def test_the_admin_examples_work_when_pasted_against_a_local_run(tmp_path: Path) -> None:
    """Operating it's admin commands, in a directory holding what they use (the example config, its
    policies, the venv), with free ports for 8080 and 9464."""
    venv = Path(sys.executable).parent.parent
    if not (venv / "bin" / "activate").exists():
        pytest.skip("the tests do not run in a virtualenv")
    block = next(b for b in shell_blocks("Operating it") if "/admin/" in b)
    ports = {"8080": str(free_port()), "9464": str(free_port())}
    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    example = (ROOT / "config.example.yaml").read_text()
    (tmp_path / ".venv").symlink_to(venv)
    for default, port in ports.items():
        example, block = example.replace(default, port), block.replace(default, port)
    (tmp_path / "config.example.yaml").write_text(example)
    env = {k: v for k, v in os.environ.items() if k not in NOT_IN_A_NEW_SHELL}
    process = subprocess.Popen(
        ["bash", "-c", "set -e\n" + block], cwd=tmp_path, env=env, start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the proxy, still draining
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, f"{stdout}\n{stderr[-6000:]}"
    config, sessions, ended, flushed = stdout.strip().splitlines()[-4:]
    assert '"sha256": ' in config and "admin-example.yaml" in config
    assert '"protocol_version": "2025-11-25"' in sessions and '"subject": ' in sessions
    assert '"upstream": "ended"' in ended
    assert '"cache": "flushed"' in flushed
