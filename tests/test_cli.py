"""The commands README.md describes, run as an operator runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from tests.factories import DEV_SECRET, DEV_SECRET_ENV, RESOURCE, config_dict

ROOT = Path(__file__).resolve().parent.parent


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def write_config(tmp_path: Path, data: dict[str, object]) -> Path:
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_example_config_checks_ok() -> None:
    result = cli("check-config", "--config", "config.example.yaml", env={"MCP_PROXY_DEV_SECRET": DEV_SECRET})
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
def test_the_examples_configs_check_ok(config: str) -> None:
    """Run for real by tests/interop/test_examples.py where node is installed."""
    result = cli("check-config", "--config", f"examples/{config}", env={"MCP_PROXY_DEV_SECRET": DEV_SECRET})
    assert result.returncode == 0, result.stderr


def test_example_config_without_its_secret_names_the_key() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MCP_PROXY_DEV_SECRET"}
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "--config", "config.example.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "config.example.yaml: auth.issuers.0.secret_env:" in result.stderr


@pytest.mark.parametrize(
    ("mutate", "key_path", "problem"),
    [
        (
            lambda d: d["tenants"]["acme"]["upstream"].update(bogus=1),
            "tenants.acme.upstream.bogus",
            "unknown key",
        ),
        (
            lambda d: d["tenants"]["acme"]["upstream"].pop("url"),
            "tenants.acme.upstream",
            "exactly one of url",
        ),
        (
            lambda d: d["auth"]["issuers"][0].update(algorithms=["none"]),
            "auth.issuers.0.algorithms.0",
            "Input",
        ),
        (lambda d: d["listen"].update(port="x"), "listen.port", "integer"),
        (lambda d: d.update(tenants={"Bad Id": {"upstream": {"url": "http://x/"}}}), "tenants", "pattern"),
        (lambda d: d["tenants"]["acme"].update(policy="missing"), "tenants.acme.policy", "does not exist"),
        (
            lambda d: d["tenants"]["acme"]["upstream"].update(url="${NOT_SET_ANYWHERE}"),
            "tenants.acme.upstream.url",
            "NOT_SET_ANYWHERE is not set",
        ),
    ],
)
def test_check_config_rejects_with_file_key_and_reason(
    tmp_path: Path, mutate: Callable[[dict[str, Any]], object], key_path: str, problem: str
) -> None:
    data = config_dict({"acme": "http://127.0.0.1:9001/mcp"})
    mutate(data)
    path = write_config(tmp_path, data)
    result = cli("check-config", "--config", str(path), env={DEV_SECRET_ENV: DEV_SECRET})
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line
    assert line.startswith(f"{path}: {key_path}")
    assert problem in line


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("listen:\n  port: [1,\n")
    result = cli("check-config", "--config", str(path))
    assert result.returncode == 2
    assert str(path) in result.stderr
    assert "line" in result.stderr


def test_duplicate_yaml_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("tenants: {}\ntenants: {}\n")
    result = cli("check-config", "--config", str(path))
    assert result.returncode == 2
    assert "duplicate key 'tenants'" in result.stderr


def test_run_with_an_invalid_config_exits_2(tmp_path: Path) -> None:
    data = config_dict({"acme": "http://127.0.0.1:9001/mcp"})
    data["listen"]["surprise"] = True
    path = write_config(tmp_path, data)
    result = cli("run", "--config", str(path), env={DEV_SECRET_ENV: DEV_SECRET})
    assert result.returncode == 2
    assert "listen.surprise: unknown key" in result.stderr


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize(
    ("secret", "problem"),
    [
        ("replace-me-with-32-or-more-random-bytes-0123456789", "holds a placeholder ('replace')"),
        ("z" * 48, "holds one character repeated"),
        ("abcdefghijklmnopqrstuvwxyz0123456789", "holds a guessable secret"),
    ],
)
def test_a_placeholder_or_guessable_hmac_secret_is_refused_before_serving(
    tmp_path: Path, command: str, secret: str, problem: str
) -> None:
    path = write_config(tmp_path, config_dict({"acme": "http://127.0.0.1:9001/mcp"}))
    result = cli(command, "--config", str(path), env={DEV_SECRET_ENV: secret}, timeout=30)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line
    assert line.startswith(
        f"{path}: auth.issuers.0.secret_env: environment variable {DEV_SECRET_ENV} {problem}"
    )
    assert secret not in line


def test_mint_token_signs_with_the_configured_secret(tmp_path: Path) -> None:
    path = write_config(tmp_path, config_dict({"acme": "http://127.0.0.1:9001/mcp"}))
    result = cli(
        "mint-token",
        "--config",
        str(path),
        "--issuer",
        "dev",
        "--tenant",
        "acme",
        "--sub",
        "alice",
        "--ttl",
        "120",
        "--scope",
        "mcp:read mcp:write",
        env={DEV_SECRET_ENV: DEV_SECRET},
    )
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(
        result.stdout.strip(), DEV_SECRET, algorithms=["HS256"], audience="http://127.0.0.1:8080/mcp"
    )
    assert (claims["tenant"], claims["sub"], claims["iss"]) == ("acme", "alice", "dev")
    assert claims["exp"] - claims["iat"] == 120
    assert claims["scope"] == "mcp:read mcp:write"


def test_mint_token_for_an_unknown_issuer_fails(tmp_path: Path) -> None:
    path = write_config(tmp_path, config_dict({"acme": "http://127.0.0.1:9001/mcp"}))
    result = cli(
        "mint-token",
        "--config",
        str(path),
        "--issuer",
        "nope",
        "--tenant",
        "acme",
        "--sub",
        "a",
        env={DEV_SECRET_ENV: DEV_SECRET},
    )
    assert result.returncode == 2
    assert "issuer 'nope' is not configured" in result.stderr


def mint(path: Path, tenant: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return cli(
        "mint-token", "--config", str(path), "--issuer", "dev", "--tenant", tenant, "--sub", "alice", *extra,
        env={DEV_SECRET_ENV: DEV_SECRET},
    )  # fmt: skip


def test_mint_token_refuses_a_tenant_the_config_does_not_define(tmp_path: Path) -> None:
    path = write_config(tmp_path, config_dict({"acme": "http://127.0.0.1:9001/mcp"}))
    refused = mint(path, "nosuch")
    assert (refused.returncode, refused.stdout) == (2, "")
    assert refused.stderr.strip() == (
        f"mint-token: tenant 'nosuch' is not configured in {path} (tenants: acme); the proxy refuses its "
        "tokens with 403. --allow-unknown-tenant mints one anyway."
    )
    allowed = mint(path, "nosuch", "--allow-unknown-tenant")
    assert allowed.returncode == 0, allowed.stderr
    claims = jwt.decode(allowed.stdout.strip(), DEV_SECRET, algorithms=["HS256"], audience=RESOURCE)
    assert claims["tenant"] == "nosuch"


def test_mint_token_prints_a_ready_authorization_header(tmp_path: Path) -> None:
    path = write_config(tmp_path, config_dict({"acme": "http://127.0.0.1:9001/mcp"}))
    result = mint(path, "acme", "--header")
    assert result.returncode == 0, result.stderr
    name, _, value = result.stdout.rstrip("\n").partition(": ")
    assert name == "Authorization" and value.startswith("Bearer ")
    claims = jwt.decode(value.removeprefix("Bearer "), DEV_SECRET, algorithms=["HS256"], audience=RESOURCE)
    assert claims["tenant"] == "acme"


@pytest.mark.e2e
def test_demo_runs_and_passes_its_isolation_checks() -> None:
    result = cli("demo", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all isolation checks passed" in result.stdout
    assert "FAIL" not in result.stdout
    assert "[ok] no process served two tenants" in result.stdout
    assert result.stdout.count("[ok] served by its own upstream process") == 4  # acme, globex; both eras
