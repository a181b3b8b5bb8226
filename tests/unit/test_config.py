"""Config loading: interpolation, strict keys, key-source and transport rules, paths, YAML strictness."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import ConfigError, ProxyConfig, load_config

BASE_YAML = """\
listen:
  host: 127.0.0.1
  port: 8080
  path: /mcp
auth:
  authorization_servers: [https://idp.example.com]
  issuers:
    - issuer: dev
      audiences: [http://127.0.0.1:8080/mcp]
      algorithms: [HS256]
      secret_env: DEV_SECRET
tenants:
  acme:
    upstream:
      url: http://127.0.0.1:9001/mcp
audit: {dir: null}
"""

BASE: dict[str, Any] = yaml.safe_load(BASE_YAML)


URL_LINE = "      url: http://127.0.0.1:9001/mcp\n"


def with_upstream_headers(flow: str) -> str:
    """BASE_YAML with `headers: <flow mapping>` under acme's upstream."""
    return BASE_YAML.replace(URL_LINE, f"{URL_LINE}      headers: {flow}\n")


def write_config(tmp_path: Path, text: str, name: str = "proxy.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> ProxyConfig:
    return load_config(write_config(tmp_path, text), env=env or {})


def load_with(tmp_path: Path, change: Callable[[dict[str, Any]], None], **env: str) -> ProxyConfig:
    data = copy.deepcopy(BASE)
    change(data)
    return load_text(tmp_path, yaml.safe_dump(data), env)


def config_error(tmp_path: Path, change: Callable[[dict[str, Any]], None], **env: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_with(tmp_path, change, **env)
    return info.value


def issuer(data: dict[str, Any]) -> dict[str, Any]:
    first: dict[str, Any] = data["auth"]["issuers"][0]
    return first


def upstream(data: dict[str, Any]) -> dict[str, Any]:
    acme: dict[str, Any] = data["tenants"]["acme"]["upstream"]
    return acme


# --- the base file is valid ------------------------------------------------------------------------


def test_base_config_loads(tmp_path: Path) -> None:
    config = load_text(tmp_path, BASE_YAML)
    assert config.listen.resource_url == "http://127.0.0.1:8080/mcp"
    assert config.auth.issuers[0].secret_env == "DEV_SECRET"
    assert config.tenants["acme"].upstream.url == "http://127.0.0.1:9001/mcp"
    assert config.source == str((tmp_path / "proxy.yaml").resolve())


# --- ${VAR} interpolation ----------------------------------------------------------------------------


def test_var_is_read_from_the_given_env_mapping(tmp_path: Path) -> None:
    text = BASE_YAML.replace("url: http://127.0.0.1:9001/mcp", "url: http://${UP_HOST}:${UP_PORT}/mcp")
    config = load_text(tmp_path, text, {"UP_HOST": "10.0.0.7", "UP_PORT": "9100"})
    assert config.tenants["acme"].upstream.url == "http://10.0.0.7:9100/mcp"


def test_var_inside_a_header_value_and_a_list(tmp_path: Path) -> None:
    text = with_upstream_headers('{Authorization: "Bearer ${ACME_TOKEN}"}').replace(
        "audiences: [http://127.0.0.1:8080/mcp]", "audiences: ['${AUD}']"
    )
    config = load_text(tmp_path, text, {"ACME_TOKEN": "s3cr3t", "AUD": "https://mcp.example/mcp"})
    assert config.tenants["acme"].upstream.headers == {"Authorization": "Bearer s3cr3t"}
    assert config.auth.issuers[0].audiences == ("https://mcp.example/mcp",)


def test_default_is_used_when_the_var_is_unset(tmp_path: Path) -> None:
    text = BASE_YAML.replace("port: 8080", "port: ${PORT:-9123}")
    assert load_text(tmp_path, text).listen.port == 9123
    assert load_text(tmp_path, text, {"PORT": "9555"}).listen.port == 9555


def test_empty_default_is_allowed(tmp_path: Path) -> None:
    text = with_upstream_headers('{X-Extra: "a${NOPE:-}b"}')
    assert load_text(tmp_path, text).tenants["acme"].upstream.headers == {"X-Extra": "ab"}


def test_default_is_used_when_the_var_is_empty(tmp_path: Path) -> None:
    text = BASE_YAML.replace("port: 8080", "port: ${PORT:-9123}")
    assert load_text(tmp_path, text, {"PORT": ""}).listen.port == 9123


def test_double_dollar_is_a_literal_dollar(tmp_path: Path) -> None:
    text = with_upstream_headers('{X-Price: "$$5 and $${NOT_A_VAR} and $$$${X}"}')
    config = load_text(tmp_path, text, {"NOT_A_VAR": "oops", "X": "oops"})
    assert config.tenants["acme"].upstream.headers == {"X-Price": "$5 and ${NOT_A_VAR} and $${X}"}


def test_substituted_values_are_not_interpolated_again(tmp_path: Path) -> None:
    text = with_upstream_headers('{X-A: "${A}"}')
    config = load_text(tmp_path, text, {"A": "${B}", "B": "secret-b"})
    assert config.tenants["acme"].upstream.headers == {"X-A": "${B}"}


def test_a_lone_dollar_and_unbraced_var_stay_as_written(tmp_path: Path) -> None:
    text = with_upstream_headers('{X-A: "cost $ and $HOME"}')
    config = load_text(tmp_path, text, {"HOME": "/root"})
    assert config.tenants["acme"].upstream.headers == {"X-A": "cost $ and $HOME"}


def test_missing_var_error_names_file_key_path_and_variable(tmp_path: Path) -> None:
    text = with_upstream_headers('{Authorization: "Bearer ${ACME_UPSTREAM_TOKEN}"}')
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"OTHER": "x"})
    error = info.value
    assert error.file == str(path.resolve())
    assert error.key_path == "tenants.acme.upstream.headers.Authorization"
    assert error.problem == "environment variable ACME_UPSTREAM_TOKEN is not set"
    assert str(error) == (
        f"{path.resolve()}: tenants.acme.upstream.headers.Authorization: "
        "environment variable ACME_UPSTREAM_TOKEN is not set"
    )
    assert "\n" not in str(error)


def test_missing_var_in_a_list_names_the_index(tmp_path: Path) -> None:
    text = BASE_YAML.replace("audiences: [http://127.0.0.1:8080/mcp]", "audiences: [a, '${AUD}']")
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    assert info.value.key_path == "auth.issuers.0.audiences.1"
    assert "AUD" in info.value.problem


def test_load_config_uses_the_env_mapping_not_os_environ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UP_PORT", "9999")
    text = BASE_YAML.replace("9001", "${UP_PORT}")
    with pytest.raises(ConfigError, match="UP_PORT"):
        load_text(tmp_path, text, {})
    assert load_config(write_config(tmp_path, text)).tenants["acme"].upstream.url == (
        "http://127.0.0.1:9999/mcp"
    )


# --- unknown keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "key_path"),
    [
        (lambda d: d.update(listn={}), "listn"),
        (lambda d: d["listen"].update(hots="x"), "listen.hots"),
        (lambda d: issuer(d).update(audience=["x"]), "auth.issuers.0.audience"),
        (lambda d: upstream(d).update(timeout=5), "tenants.acme.upstream.timeout"),
        (lambda d: d["tenants"]["acme"].update(polcy="default"), "tenants.acme.polcy"),
        (lambda d: d.update(sessions={"idle_timeout": 5}), "sessions.idle_timeout"),
    ],
)
def test_unknown_keys_are_rejected_with_their_path(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], key_path: str
) -> None:
    error = config_error(tmp_path, change)
    assert error.key_path == key_path
    assert error.problem.split(";")[0] == "unknown key"


def test_several_problems_are_reported_on_one_line(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["listen"].update(hots="x", port="eighty")

    error = config_error(tmp_path, change)
    assert "\n" not in str(error)
    assert "listen.hots: unknown key" in str(error)
    assert "listen.port" in str(error)


# --- issuers: exactly one key source, HS* vs asymmetric -------------------------------------------

ONE_KEY_SOURCE = "exactly one of secret_env, public_key_file, jwks_url must be set"


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"secret_env": None}, ONE_KEY_SOURCE),
        ({"public_key_file": "keys/idp.pem"}, ONE_KEY_SOURCE),
        ({"jwks_url": "https://idp.example.com/jwks.json"}, ONE_KEY_SOURCE),
        (
            {"secret_env": None, "public_key_file": "k.pem", "jwks_url": "https://idp.example.com/j"},
            ONE_KEY_SOURCE,
        ),
        ({"algorithms": ["HS256", "RS256"]}, "algorithms must not mix HS* with asymmetric algorithms"),
        ({"secret_env": None, "public_key_file": "k.pem"}, "HS* algorithms need secret_env"),
        ({"secret_env": None, "jwks_url": "https://idp.example.com/j"}, "HS* algorithms need secret_env"),
        ({"algorithms": ["RS256"]}, "secret_env is only for HS* algorithms"),
        ({"algorithms": ["ES256", "EdDSA"]}, "secret_env is only for HS* algorithms"),
    ],
)
def test_issuer_key_source_rules(tmp_path: Path, fields: dict[str, Any], problem: str) -> None:
    def change(d: dict[str, Any]) -> None:
        for key, value in fields.items():
            if value is None:
                issuer(d).pop(key, None)
            else:
                issuer(d)[key] = value

    error = config_error(tmp_path, change)
    assert error.key_path == "auth.issuers.0"
    assert error.problem.startswith(problem)


@pytest.mark.parametrize(
    "fields",
    [
        {"algorithms": ["HS256", "HS512"]},
        {"algorithms": ["RS256", "ES256"], "secret_env": None, "public_key_file": "k.pem"},
        {"algorithms": ["RS256"], "secret_env": None, "jwks_url": "https://idp.example.com/jwks.json"},
    ],
)
def test_valid_issuer_key_sources(tmp_path: Path, fields: dict[str, Any]) -> None:
    def change(d: dict[str, Any]) -> None:
        for key, value in fields.items():
            if value is None:
                issuer(d).pop(key, None)
            else:
                issuer(d)[key] = value

    config = load_with(tmp_path, change)
    assert config.auth.issuers[0].algorithms == tuple(fields["algorithms"])


def test_an_invalid_issuer_reports_only_its_own_problem(tmp_path: Path) -> None:
    error = config_error(tmp_path, lambda d: issuer(d).update(algorithms=["HS256", "RS256"]))
    assert "at least 1 item" not in str(error)


@pytest.mark.parametrize("algorithm", ["none", "None", "HS1", "RS1", "rs256"])
def test_unknown_algorithms_are_refused(tmp_path: Path, algorithm: str) -> None:
    error = config_error(tmp_path, lambda d: issuer(d).update(algorithms=[algorithm]))
    assert error.key_path == "auth.issuers.0.algorithms.0"


def test_the_same_issuer_twice_is_refused(tmp_path: Path) -> None:
    error = config_error(tmp_path, lambda d: d["auth"]["issuers"].append(copy.deepcopy(issuer(d))))
    assert error.key_path == "auth.issuers"
    assert "configured twice" in error.problem


def test_jwks_url_must_be_http(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        issuer(d).pop("secret_env")
        issuer(d).update(algorithms=["RS256"], jwks_url="file:///etc/passwd")

    error = config_error(tmp_path, change)
    assert error.key_path == "auth.issuers.0.jwks_url"
    assert "http(s) URL" in error.problem


# --- upstream: url xor command ---------------------------------------------------------------------

ONE_TRANSPORT = "exactly one of url (HTTP upstream) or command (stdio upstream) must be set"


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"url": None}, ONE_TRANSPORT),
        ({"command": ["python", "-m", "server"]}, ONE_TRANSPORT),
        ({"url": None, "command": ["srv"], "headers": {"X-A": "1"}}, "headers and tenant_header apply only"),
        ({"url": None, "command": ["srv"], "tenant_header": "X-T"}, "headers and tenant_header apply only"),
        ({"env": {"A": "1"}}, "env, inherit_env, cwd and isolation apply only to stdio upstreams"),
        ({"cwd": "work"}, "env, inherit_env, cwd and isolation apply only to stdio upstreams"),
        ({"isolation": "per_session"}, "env, inherit_env, cwd and isolation apply only to stdio upstreams"),
        ({"inherit_env": ["PATH"]}, "env, inherit_env, cwd and isolation apply only to stdio upstreams"),
        ({"max_processes": 2}, "max_processes apply only to stdio upstreams"),
        ({"limits": {"open_files": 10}}, "limits apply only to stdio upstreams"),
    ],
)
def test_upstream_transport_rules(tmp_path: Path, fields: dict[str, Any], problem: str) -> None:
    def change(d: dict[str, Any]) -> None:
        for key, value in fields.items():
            if value is None:
                upstream(d).pop(key, None)
            else:
                upstream(d)[key] = value

    error = config_error(tmp_path, change)
    assert error.key_path == "tenants.acme.upstream"
    assert error.problem.startswith(problem)


def test_stdio_capacity_defaults_and_bounds(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        upstream(d).pop("url")
        upstream(d)["command"] = ["srv"]

    acme = load_with(tmp_path, change).tenants["acme"].upstream
    assert (acme.max_processes, acme.idle_stop_seconds) == (8, 300.0)
    assert (acme.limits.memory_bytes, acme.limits.cpu_seconds, acme.limits.open_files) == (2**31, 3600, 1024)

    def no_processes(d: dict[str, Any]) -> None:
        change(d)
        upstream(d).update(max_processes=0)

    error = config_error(tmp_path, no_processes)
    assert error.key_path == "tenants.acme.upstream.max_processes"


def test_empty_command_is_refused(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        upstream(d).pop("url")
        upstream(d)["command"] = []

    error = config_error(tmp_path, change)
    assert error.key_path.startswith("tenants.acme.upstream")


def test_stdio_upstream_with_env_and_cwd_is_valid(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        upstream(d).pop("url")
        upstream(d).update(command=["python", "-m", "srv"], env={"DATA_DIR": "/srv"}, cwd="work")

    config = load_with(tmp_path, change)
    acme = config.tenants["acme"].upstream
    assert acme.command == ("python", "-m", "srv")
    assert acme.url is None
    assert acme.cwd == (tmp_path / "work").resolve()


@pytest.mark.parametrize(
    ("command", "program"),
    [
        (["./srv.sh", "./data"], "{base}/srv.sh"),  # relative to the config file, not the proxy's cwd
        (["bin/server"], "{base}/bin/server"),
        (["../tools/server"], "{parent}/tools/server"),
        (["/usr/bin/server"], "/usr/bin/server"),
        (["python", "-m", "srv"], "python"),  # a bare name is looked up on PATH
    ],
)
def test_a_relative_program_path_is_relative_to_the_config_file(
    tmp_path: Path, command: list[str], program: str
) -> None:
    def change(d: dict[str, Any]) -> None:
        upstream(d).pop("url")
        upstream(d)["command"] = command

    config = load_with(tmp_path, change)
    base = tmp_path.resolve()
    resolved = config.tenants["acme"].upstream.command
    assert resolved is not None
    assert resolved[0] == program.format(base=base, parent=base.parent)
    assert list(resolved[1:]) == command[1:]  # arguments are passed as they are


@pytest.mark.parametrize("url", ["ftp://host/mcp", "file:///tmp/x", "http:///nohost", "127.0.0.1:9001"])
def test_upstream_url_must_be_http(tmp_path: Path, url: str) -> None:
    error = config_error(tmp_path, lambda d: upstream(d).update(url=url))
    assert error.key_path == "tenants.acme.upstream.url"


@pytest.mark.parametrize(
    "name",
    [
        "Host",
        "content-length",
        "Content-Type",
        "ACCEPT",
        "Transfer-Encoding",
        "Connection",
        "Mcp-Session-Id",
        "MCP-Protocol-Version",
        "Mcp-Method",
        "Mcp-Name",
        "Last-Event-ID",
    ],
)
def test_reserved_upstream_headers_are_refused(tmp_path: Path, name: str) -> None:
    error = config_error(tmp_path, lambda d: upstream(d).update(headers={name: "x"}))
    assert error.key_path == "tenants.acme.upstream.headers"
    assert error.problem == f"header {name!r} is set by the proxy and cannot be configured"


@pytest.mark.parametrize("name", ["Bad Header", "X-A:b", "X-\u00e9", ""])
def test_invalid_header_names_are_refused(tmp_path: Path, name: str) -> None:
    error = config_error(tmp_path, lambda d: upstream(d).update(headers={name: "x"}))
    assert error.key_path.startswith("tenants.acme.upstream.headers")


def test_ordinary_upstream_headers_are_kept(tmp_path: Path) -> None:
    config = load_with(
        tmp_path,
        lambda d: upstream(d).update(
            headers={"Authorization": "Bearer t", "X-Api-Key": "k"}, tenant_header="X-MCP-Tenant"
        ),
    )
    acme = config.tenants["acme"].upstream
    assert acme.headers == {"Authorization": "Bearer t", "X-Api-Key": "k"}
    assert acme.tenant_header == "X-MCP-Tenant"


# --- tenant ids ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tenant", ["a", "acme", "Acme-2", "a.b_c-d", "0", "a" * 64])
def test_valid_tenant_ids(tmp_path: Path, tenant: str) -> None:
    config = load_with(tmp_path, lambda d: d.update(tenants={tenant: d["tenants"]["acme"]}))
    assert list(config.tenants) == [tenant]


@pytest.mark.parametrize(
    "tenant",
    ["-acme", ".acme", "_acme", "a" * 65, "ac me", "a:b", "a/b", "acm\u00e9", "\u0430cme", "acme\n", ""],
)
def test_invalid_tenant_ids_are_refused(tmp_path: Path, tenant: str) -> None:
    error = config_error(tmp_path, lambda d: d.update(tenants={tenant: d["tenants"]["acme"]}))
    assert error.key_path.startswith("tenants.")
    assert "should match pattern" in error.problem


def test_at_least_one_tenant(tmp_path: Path) -> None:
    error = config_error(tmp_path, lambda d: d.update(tenants={}))
    assert error.key_path == "tenants"


# --- paths ------------------------------------------------------------------------------------------


def test_relative_paths_are_resolved_against_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc" / "proxy"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data = copy.deepcopy(BASE)
    data["auth"]["issuers"].append(
        {
            "issuer": "rsa",
            "audiences": ["http://127.0.0.1:8080/mcp"],
            "algorithms": ["RS256"],
            "public_key_file": "keys/idp.pem",
            "private_key_file": "../secret/idp.key",
        }
    )
    data["policies_dir"] = "policies"
    data["audit"] = {"dir": "audit"}
    data["tenants"]["globex"] = {"upstream": {"command": ["srv"], "cwd": "work/globex"}}
    write_config(conf_dir, yaml.safe_dump(data))
    config = load_config(Path("..") / "etc" / "proxy" / "proxy.yaml", env={})
    base = conf_dir.resolve()
    rsa = config.auth.issuers[1]
    assert rsa.public_key_file == base / "keys" / "idp.pem"
    assert rsa.private_key_file == (base / ".." / "secret" / "idp.key").resolve()
    assert config.policies_dir == base / "policies"
    assert config.audit.dir == base / "audit"
    assert config.tenants["globex"].upstream.cwd == base / "work" / "globex"
    assert config.source == str(base / "proxy.yaml")


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    absolute = tmp_path / "abs" / "idp.pem"

    def change(d: dict[str, Any]) -> None:
        issuer(d).pop("secret_env")
        issuer(d).update(algorithms=["RS256"], public_key_file=str(absolute))
        d["policies_dir"] = str(tmp_path / "pol")

    config = load_with(tmp_path, change)
    assert config.auth.issuers[0].public_key_file == absolute
    assert config.policies_dir == tmp_path / "pol"


def test_a_named_policy_must_exist(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["policies_dir"] = "pol"
        d["tenants"]["acme"]["policy"] = "strict"

    error = config_error(tmp_path, change)
    assert error.key_path == "tenants.acme.policy"
    assert error.problem == f"policy file {tmp_path.resolve() / 'pol' / 'strict.yaml'} does not exist"


def test_a_named_policy_that_exists_loads(tmp_path: Path) -> None:
    (tmp_path / "pol").mkdir()
    (tmp_path / "pol" / "strict.yaml").write_text("{}\n")

    def change(d: dict[str, Any]) -> None:
        d["policies_dir"] = "pol"
        d["tenants"]["acme"]["policy"] = "strict"

    config = load_with(tmp_path, change)
    assert config.policy_file("strict") == tmp_path.resolve() / "pol" / "strict.yaml"


def test_default_paths_are_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data = copy.deepcopy(BASE)
    del data["audit"]
    config = load_config(write_config(tmp_path / "conf", yaml.safe_dump(data)), env={})
    base = (tmp_path / "conf").resolve()
    assert (config.policies_dir, config.audit.dir) == (base / "policies", base / "audit")


@pytest.mark.parametrize("name", ["../escape", "a/b", "", "a b"])
def test_policy_names_cannot_be_paths(tmp_path: Path, name: str) -> None:
    error = config_error(tmp_path, lambda d: d["tenants"]["acme"].update(policy=name))
    assert error.key_path == "tenants.acme.policy"


# --- YAML strictness -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (BASE_YAML + "tenants:\n  globex:\n    upstream: {url: http://127.0.0.1:9002/mcp}\n", "tenants"),
        (
            BASE_YAML.replace(
                "      url: http://127.0.0.1:9001/mcp\n",
                "      url: http://127.0.0.1:9001/mcp\n      url: http://evil.example/mcp\n",
            ),
            "url",
        ),
        (
            BASE_YAML.replace("      secret_env: DEV_SECRET\n", "      secret_env: A\n      secret_env: B\n"),
            "secret_env",
        ),
        (BASE_YAML.replace("audit: {dir: null}", "audit: {dir: null, dir: x}"), "dir"),
    ],
)
def test_duplicate_yaml_keys_are_refused(tmp_path: Path, text: str, key: str) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.file == str(path.resolve())
    assert f"duplicate key {key!r}" in info.value.problem
    assert "(line " in info.value.problem


def test_yaml_anchors_and_aliases_still_work(tmp_path: Path) -> None:
    text = BASE_YAML.replace("    upstream:\n      url:", "    upstream: &up\n      url:")
    text = text.replace("audit:", "  globex:\n    upstream: *up\naudit:")
    config = load_text(tmp_path, text)
    assert config.tenants["globex"].upstream.url == "http://127.0.0.1:9001/mcp"


def test_yaml_merge_keys_work(tmp_path: Path) -> None:
    text = BASE_YAML.replace("    upstream:\n      url:", "    upstream: &up\n      url:")
    text = text.replace(
        "audit:", "  globex:\n    upstream:\n      <<: *up\n      read_timeout_seconds: 10\naudit:"
    )
    config = load_text(tmp_path, text)
    assert config.tenants["globex"].upstream.url == "http://127.0.0.1:9001/mcp"
    assert config.tenants["globex"].upstream.read_timeout_seconds == 10


def test_unhashable_yaml_key_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_text(tmp_path, "? [1, 2]\n: a\n")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("- a\n- b\n", "the config must be a YAML mapping"),
        ("", "the config must be a YAML mapping"),
        ("listen: [unclosed\n", "invalid YAML (line"),
        (b"listen:\n  host: \xff\n", "file is not valid UTF-8"),
        ("a: !!python/object/apply:os.system ['true']\n", "invalid YAML"),
    ],
)
def test_unusable_files_are_config_errors(tmp_path: Path, content: str | bytes, problem: str) -> None:
    path = tmp_path / "proxy.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.file == str(path.resolve())
    assert problem in info.value.problem


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml", env={})
    assert info.value.problem.startswith("cannot read file")


def test_an_unquoted_numeric_tenant_id_and_a_key_with_a_newline_give_one_clear_line(tmp_path: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["tenants"][1234] = d["tenants"]["acme"]
        d["tenants"]["ac\nme"] = d["tenants"]["acme"]

    error = config_error(tmp_path, change)
    assert error.key_path == "tenants.1234.[key]"
    assert "must be a string: quote it in the YAML" in error.problem
    assert "\n" not in str(error)
    assert "ac\\nme" in str(error)


# --- stdio: what the child's environment holds -----------------------------------------------------


def stdio(data: dict[str, Any], **fields: Any) -> None:
    data["tenants"]["acme"]["upstream"] = {"command": ["server"], **fields}


def test_inherit_env_copies_the_named_variables_the_proxy_has_and_env_wins(tmp_path: Path) -> None:
    config = load_with(
        tmp_path, lambda d: stdio(d, inherit_env=["PATH", "HOME", "UNSET_ONE"], env={"HOME": "/w"})
    )
    proxy_env = {"PATH": "/usr/bin", "HOME": "/root", "DEV_SECRET": "s" * 40, "OTHER": "x"}
    assert config.tenants["acme"].upstream.child_environment(proxy_env) == {"PATH": "/usr/bin", "HOME": "/w"}


def test_without_inherit_env_the_child_gets_only_env(tmp_path: Path) -> None:
    config = load_with(tmp_path, lambda d: stdio(d, env={"A": "1"}))
    assert config.tenants["acme"].upstream.child_environment({"PATH": "/usr/bin"}) == {"A": "1"}


@pytest.mark.parametrize("secret_variable", ["DEV_SECRET", "METRICS_TOKEN"])
def test_inherit_env_cannot_hand_a_child_the_proxys_secrets(tmp_path: Path, secret_variable: str) -> None:
    def change(d: dict[str, Any]) -> None:
        stdio(d, inherit_env=["PATH", secret_variable])
        d["metrics"] = {"bearer_token_env": "METRICS_TOKEN"}

    error = config_error(tmp_path, change)
    assert f"tenants.acme.upstream.inherit_env.1: {secret_variable} holds a secret of the proxy" in str(error)


def test_inherit_env_names_must_be_variable_names(tmp_path: Path) -> None:
    error = config_error(tmp_path, lambda d: stdio(d, inherit_env=["PATH=/bin"]))
    assert error.key_path == "tenants.acme.upstream.inherit_env.0"


def test_state_url_may_name_a_redis_cluster(tmp_path: Path) -> None:
    def state(**keys: Any) -> Callable[[dict[str, Any]], None]:
        return lambda d: d.update(state={"backend": "redis", **keys})

    for url in ("redis+cluster://10.0.0.5:7000", "rediss+cluster://:pw@redis.internal:7000"):
        assert load_with(tmp_path, state(url=url)).state.is_cluster
    assert load_with(tmp_path, state(url="redis://10.0.0.5:7000", cluster=True)).state.is_cluster
    assert not load_with(tmp_path, state(url="redis://10.0.0.5:6379/0")).state.is_cluster
    error = config_error(tmp_path, state(url="unix:///run/redis.sock", cluster=True))
    assert error.key_path == "state" and "over TCP" in error.problem
    assert "redis+cluster://" in config_error(tmp_path, state(url="cluster://10.0.0.5:7000")).problem
    assert "database 0" in config_error(tmp_path, state(url="redis+cluster://10.0.0.5:7000/2")).problem
    assert load_with(tmp_path, state(url="redis+cluster://10.0.0.5:7000/0")).state.is_cluster
