"""deploy/kubernetes.yaml: parses, wires probes and mounts consistently, and embeds a valid config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def documents() -> dict[str, Any]:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text()))
    return {doc["kind"]: doc for doc in docs}


def test_the_embedded_config_passes_check_config(tmp_path: Path) -> None:
    docs = documents()
    volume = next(
        v for v in docs["Deployment"]["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"
    )
    for item in volume["configMap"]["items"]:  # lay the files out as the kubelet mounts them
        target = tmp_path / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(docs["ConfigMap"]["data"][item["key"]])
    env = {**os.environ, **docs["Secret"]["stringData"]}
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "--config", str(tmp_path / "config.yaml")],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "2 tenants" in result.stdout


def test_the_sidecar_is_probed_and_mounted_where_its_command_looks() -> None:
    docs = documents()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    proxy = next(c for c in pod["containers"] if c["name"] == "mcp-tenant-proxy")
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert proxy["livenessProbe"]["httpGet"]["path"] == "/healthz"
    config_path = proxy["args"][proxy["args"].index("--config") + 1]
    mount = next(m for m in proxy["volumeMounts"] if m["name"] == "config")
    assert config_path == f"{mount['mountPath']}/config.yaml"
    assert "subPath" not in mount  # subPath mounts never see ConfigMap updates (no hot reload)
    assert proxy["envFrom"][0]["secretRef"]["name"] == docs["Secret"]["metadata"]["name"]
    config = yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])
    assert proxy["ports"][0]["containerPort"] == config["listen"]["port"]
    assert pod["terminationGracePeriodSeconds"] > 10  # longer than the proxy's drain
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]


def test_the_replicas_example_shares_state_in_redis_and_routes_sessions_sticky(tmp_path: Path) -> None:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes-replicas.yaml").read_text()))
    by_name = {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}
    config_map = by_name["ConfigMap", "mcp-tenant-proxy"]
    proxy_deployment = by_name["Deployment", "mcp-tenant-proxy"]
    pod = proxy_deployment["spec"]["template"]["spec"]
    for item in pod["volumes"][0]["configMap"]["items"]:
        target = tmp_path / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(config_map["data"][item["key"]])
    env = {**os.environ, **by_name["Secret", "mcp-tenant-proxy"]["stringData"]}
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "--config", str(tmp_path / "config.yaml")],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert proxy_deployment["spec"]["replicas"] > 1
    assert config["state"]["backend"] == "redis"
    redis_service = by_name["Service", "mcp-tenant-proxy-redis"]
    assert (
        f"@{redis_service['metadata']['name']}:{redis_service['spec']['ports'][0]['port']}/"
        in config["state"]["url"]
    )
    redis_pod = by_name["Deployment", "mcp-tenant-proxy-redis"]["spec"]["template"]
    assert redis_service["spec"]["selector"] == redis_pod["metadata"]["labels"]
    ingress = by_name["Ingress", "mcp-tenant-proxy"]
    assert (
        ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"]
        == "$http_mcp_session_id"
    )
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "mcp-tenant-proxy"
    assert (
        by_name["Service", "mcp-tenant-proxy"]["spec"]["selector"]
        == proxy_deployment["spec"]["selector"]["matchLabels"]
    )
