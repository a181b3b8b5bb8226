"""deploy/: the Kubernetes examples, the Dockerfile and its lock file are safe as shipped.

Every rule is a function returning the problems it finds. The shipped files must have none, and
each rule is shown to catch a breakage of them (test_a_rule_catches_its_breakage), so no rule
passes by looking at nothing. The configs the manifests embed pass check-config.
"""

from __future__ import annotations

import copy
import os
import re
import secrets
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROXY_CONTAINER = "mcp-tenant-proxy"
SHUTDOWN_MARGIN_SECONDS = 5
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
SECRETISH_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|KEY|CREDENTIAL", re.IGNORECASE)
PINNED_REDIS_IMAGE = re.compile(
    r"^(docker\.io/(library/)?)?redis:\d+\.\d+\.\d+(-alpine[\d.]*)?(@sha256:[0-9a-f]{64})?$"
)


# --- the manifests ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    name: str
    text: str
    docs: tuple[dict[str, Any], ...]

    @classmethod
    def load(cls, name: str) -> Manifest:
        text = (DEPLOY / name).read_text()
        return cls(name, text, tuple(doc for doc in yaml.safe_load_all(text) if doc is not None))

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [d for d in self.docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
        assert len(found) == 1, f"{self.name}: expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def workloads(self) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] in WORKLOAD_KINDS]

    def pods(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for workload in self.workloads():
            yield workload["metadata"]["name"], workload["spec"]["template"]["spec"]

    def containers(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for workload, pod in self.pods():
            for container in [*pod.get("initContainers", []), *pod["containers"]]:
                yield f"{workload}/{container['name']}", container

    def proxy_pod(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(workload, pod spec, proxy container)."""
        for workload in self.workloads():
            pod = workload["spec"]["template"]["spec"]
            for container in pod["containers"]:
                if container["name"] == PROXY_CONTAINER:
                    return workload, pod, container
        raise AssertionError(f"{self.name}: no {PROXY_CONTAINER} container")

    def config_files(self) -> dict[str, str]:
        """The proxy's config directory as the kubelet mounts it: relative path -> text."""
        _, pod, _ = self.proxy_pod()
        volume = next(v for v in pod["volumes"] if v["name"] == "config")
        data = self.one("ConfigMap", volume["configMap"]["name"])["data"]
        return {item["path"]: data[item["key"]] for item in volume["configMap"]["items"]}

    def config(self) -> dict[str, Any]:
        parsed: dict[str, Any] = yaml.safe_load(self.config_files()["config.yaml"])
        return parsed

    def secret_commands(self) -> dict[str, set[str]]:
        """The Secrets the header comment says to create: name -> keys."""
        return secret_commands(self.text)


MANIFESTS = ("kubernetes.yaml", "kubernetes-replicas.yaml")


def header_commands(text: str) -> list[str]:
    """The `kubectl create secret` commands of a file's comments, continuation lines joined."""
    comment = "\n".join(
        line.lstrip("#").strip() for line in text.splitlines() if line.lstrip().startswith("#")
    )
    return [
        " ".join(c.split())
        for c in re.findall(r"kubectl create secret .*$", comment.replace("\\\n", " "), re.M)
    ]


def secret_commands(text: str) -> dict[str, set[str]]:
    """The Secrets a file's comments say to create: name -> keys."""
    created: dict[str, set[str]] = {}
    for command in header_commands(text):
        words = shlex.split(command)
        kind, name = words[3], words[4]
        if kind == "tls":
            created[name] = {"tls.crt", "tls.key"}
            continue
        keys = set()
        for word in words[5:]:
            match = re.fullmatch(r"--from-(?:file|literal)=([A-Za-z0-9_.-]+)=.+", word, re.S)
            assert match, f"{word!r}: name the key (--from-file=KEY=path, --from-literal=KEY=value)"
            keys.add(match.group(1))
        created[name] = keys
    return created


def env_of(manifest: Manifest, container: dict[str, Any]) -> dict[str, str]:
    """The environment the container gets, with fake values for every secret it is given."""
    documented = manifest.secret_commands()
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        for key in documented.get(source["secretRef"]["name"], set()):
            env[key] = secrets.token_urlsafe(32)
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", secrets.token_urlsafe(32))
    return env


# --- the rules: each returns the problems it finds --------------------------------------------------


def no_inline_credentials(m: Manifest) -> list[str]:
    problems = [
        f"Secret {d['metadata']['name']} holds values inline ({key})"
        for d in m.all("Secret")
        for key in ("data", "stringData")
        if d.get(key)
    ]
    for where, container in m.containers():
        for var in container.get("env", []):
            if "value" in var and SECRETISH_NAME.search(var["name"]):
                problems.append(f"{where}: env {var['name']} has an inline value")
    for tenant, spec in m.config().get("tenants", {}).items():
        for header, value in (spec["upstream"].get("headers") or {}).items():
            if "${" not in value:
                problems.append(f"tenants.{tenant}.upstream.headers.{header} is inline, not ${{VAR}}")
    state_url = m.config().get("state", {}).get("url")
    if state_url and re.search(r"//[^/@]*:(?!\$\{)[^/@]+@", state_url):
        problems.append("state.url holds a password inline")
    return problems


def secrets_are_created_by_documented_commands(m: Manifest) -> list[str]:
    documented = m.secret_commands()
    problems = []
    if not documented:
        problems.append("the header documents no `kubectl create secret` command")
    readme = " ".join((ROOT / "README.md").read_text().replace("\\\n", " ").split())
    problems += [f"README does not show `{c}`" for c in header_commands(m.text) if c not in readme]
    for where, container in m.containers():
        for source in container.get("envFrom", []):
            name = source["secretRef"]["name"]
            if name not in documented:
                problems.append(f"{where}: envFrom Secret {name} is not created by a documented command")
        for var in container.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref and ref["key"] not in documented.get(ref["name"], set()):
                problems.append(f"{where}: {ref['name']}/{ref['key']} is not created by a documented command")
    for _, pod in m.pods():
        for volume in pod.get("volumes", []):
            if "secret" in volume and volume["secret"]["secretName"] not in documented:
                problems.append(f"volume {volume['name']}: Secret is not created by a documented command")
    for ingress in m.all("Ingress"):
        for tls in ingress["spec"].get("tls", []):
            if tls.get("secretName") not in documented:
                problems.append(f"Ingress TLS Secret {tls.get('secretName')} is not documented")
    return problems


def only_asymmetric_issuers(m: Manifest) -> list[str]:
    problems = []
    for index, issuer in enumerate(m.config()["auth"]["issuers"]):
        if "secret_env" in issuer or any(a.upper().startswith("HS") for a in issuer["algorithms"]):
            problems.append(f"auth.issuers.{index} ({issuer['issuer']}) is an HS* shared-secret issuer")
        if not (issuer.get("jwks_url") or issuer.get("public_key_file")):
            problems.append(f"auth.issuers.{index} has neither jwks_url nor public_key_file")
    return problems


def containers_are_locked_down(m: Manifest) -> list[str]:
    problems = []
    for where, container in m.containers():
        sc = container.get("securityContext") or {}
        expected = {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        problems += [
            f"{where}: securityContext.{k} is not {v}" for k, v in expected.items() if sc.get(k) != v
        ]
        for key in ("runAsUser", "runAsGroup"):
            if not (isinstance(sc.get(key), int) and not isinstance(sc.get(key), bool) and sc[key] > 0):
                problems.append(f"{where}: securityContext.{key} is not a non-root number")
        if sc.get("privileged"):
            problems.append(f"{where}: privileged")
    return problems


def containers_are_probed_and_bounded(m: Manifest) -> list[str]:
    problems = []
    for where, container in m.containers():
        problems += [f"{where}: no {p}" for p in ("readinessProbe", "livenessProbe") if p not in container]
        resources = container.get("resources", {})
        if not {"cpu", "memory"} <= resources.get("requests", {}).keys():
            problems.append(f"{where}: no cpu and memory requests")
        if "memory" not in resources.get("limits", {}):
            problems.append(f"{where}: no memory limit")
    return problems


def proxy_writes_only_to_volumes(m: Manifest) -> list[str]:
    _, pod, proxy = m.proxy_pod()
    audit_dir = m.config().get("audit", {"dir": "audit"}).get("dir")
    if audit_dir is None:
        return []
    if not str(audit_dir).startswith("/"):
        return [f"audit.dir {audit_dir} is relative to the read-only config mount"]
    writable = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v or "persistentVolumeClaim" in v}
    for mount in proxy.get("volumeMounts", []):
        inside = f"{audit_dir}/".startswith(f"{mount['mountPath'].rstrip('/')}/")
        if inside and mount["name"] in writable and not mount.get("readOnly"):
            return []
    return [f"audit.dir {audit_dir} is not on a writable emptyDir or PVC mount"]


def _sleep_seconds(container: dict[str, Any]) -> float | None:
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop.get("exec", {}).get("command", [])
    if len(command) == 2 and command[0] in ("sleep", "/bin/sleep"):
        return float(command[1])
    return None


def shutdown_is_graceful(m: Manifest) -> list[str]:
    """The proxy keeps serving a few seconds after SIGTERM (listen.drain_delay_seconds, and a preStop
    sleep if there is one), then gets its grace and 1 s more (ops/drain.py); the pod allows for all
    of it, and an MCP server beside the proxy outlives it."""
    _, pod, proxy = m.proxy_pod()
    listen = m.config()["listen"]
    grace = float(listen.get("shutdown_grace_seconds", 10))
    delay = (_sleep_seconds(proxy) or 0) + float(listen.get("drain_delay_seconds", 5))
    if not 1 <= delay <= 30:
        return [f"the proxy keeps serving {delay} s after SIGTERM, not a few seconds (drain_delay_seconds)"]
    stop = delay + grace + 1  # the proxy has exited by then
    problems = []
    period = pod.get("terminationGracePeriodSeconds", 30)
    if period <= stop + SHUTDOWN_MARGIN_SECONDS:
        problems.append(
            f"terminationGracePeriodSeconds {period} is not more than the drain delay {delay} + "
            f"shutdown_grace_seconds {grace} + 1 + {SHUTDOWN_MARGIN_SECONDS}"
        )
    for other in pod["containers"]:  # an upstream beside the proxy must outlive its stop
        if other is not proxy:
            wait = _sleep_seconds(other)
            if wait is None or not stop <= wait < period:
                problems.append(f"{other['name']} stops before the proxy's drain ends ({wait})")
    return problems


def proxy_is_wired(m: Manifest) -> list[str]:
    workload, _, proxy = m.proxy_pod()
    problems = []
    if proxy["readinessProbe"].get("httpGet", {}).get("path") != "/readyz":
        problems.append("the proxy's readinessProbe is not GET /readyz")
    if proxy["livenessProbe"].get("httpGet", {}).get("path") != "/healthz":
        problems.append("the proxy's livenessProbe is not GET /healthz")
    config_path = proxy["args"][proxy["args"].index("--config") + 1]
    mount = next(mount for mount in proxy["volumeMounts"] if mount["name"] == "config")
    if config_path != f"{mount['mountPath']}/config.yaml":
        problems.append(f"--config {config_path} is not where the config is mounted")
    if "subPath" in mount:  # subPath mounts never see ConfigMap updates (no hot reload)
        problems.append("the config is mounted with subPath")
    if proxy["ports"][0]["containerPort"] != m.config()["listen"]["port"]:
        problems.append("the container port is not listen.port")
    selectors = [s["spec"]["selector"] for s in m.all("Service")]
    if workload["spec"]["selector"]["matchLabels"] not in selectors:
        problems.append("no Service selects the proxy's pods")
    for policy in m.config_files():
        if policy.startswith("policies/"):
            name = policy.removeprefix("policies/").removesuffix(".yaml")
            if not any(t.get("policy") == name for t in m.config()["tenants"].values()):
                problems.append(f"{policy} is named by no tenant: check-config would not compile it")
    return problems


def metrics_are_scraped_on_their_own_port(m: Manifest) -> list[str]:
    """/metrics names every tenant: scraped on the metrics listener, which no Service exposes."""
    workload, _, proxy = m.proxy_pod()
    metrics = m.config().get("metrics", {})
    listen = metrics.get("listen", {})
    if listen is None:
        return ["metrics.listen is null: nothing to scrape"]
    port, problems = listen.get("port", 9464), []
    if metrics.get("public"):
        problems.append("metrics.public: the public listener serves /metrics")
    if listen.get("host", "127.0.0.1") in ("127.0.0.1", "localhost", "::1"):
        problems.append("the metrics listener is on loopback: nothing outside the pod can scrape it")
    ports = {p.get("name"): p["containerPort"] for p in proxy["ports"]}
    if ports.get("metrics") != port:
        problems.append(f"no container port named metrics is metrics.listen.port ({port})")
    if port == m.config()["listen"]["port"]:
        problems.append("metrics share the public port")
    annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/scrape") != "true":
        problems.append("the pod is not annotated for scraping")
    scraped = annotations.get("prometheus.io/port")
    if scraped != str(port):
        problems.append(f"the scrape annotation names port {scraped}, not metrics.listen.port {port}")
    if annotations.get("prometheus.io/path", "/metrics") != "/metrics":
        problems.append("the scrape annotation names another path")
    for service in m.all("Service"):
        if service["spec"]["selector"] == workload["spec"]["selector"]["matchLabels"]:
            for exposed in service["spec"]["ports"]:
                if exposed.get("targetPort") in ("metrics", port):
                    problems.append(f"Service {service['metadata']['name']} exposes the metrics port")
    return problems


def redis_keeps_sessions(m: Manifest) -> list[str]:
    if m.config().get("state", {}).get("backend") != "redis":
        return []
    redis = [(where, c) for where, c in m.containers() if "redis" in c["image"].split(":")[0]]
    if len(redis) != 1:
        return [f"expected one Redis container, found {len(redis)}"]
    where, container = redis[0]
    args = [str(a) for a in container.get("args", [])]
    problems = []
    if not PINNED_REDIS_IMAGE.match(container["image"]):
        problems.append(f"{where}: image {container['image']} is not pinned to a release (x.y.z)")

    def arg(name: str) -> str | None:
        return args[args.index(name) + 1] if name in args[:-1] else None

    if arg("--maxmemory-policy") != "noeviction":
        problems.append(f"{where}: --maxmemory-policy is not noeviction (live sessions could be evicted)")
    password = arg("--requirepass") or ""
    variable = re.fullmatch(r"\$\((\w+)\)", password)
    env = {v["name"]: v for v in container.get("env", [])}
    if not variable or "secretKeyRef" not in env.get(variable.group(1), {}).get("valueFrom", {}):
        problems.append(f"{where}: --requirepass is not taken from a Secret")
    for probe in ("readinessProbe", "livenessProbe"):
        command = " ".join(container.get(probe, {}).get("exec", {}).get("command", []))
        if "ping" not in command or "PONG" not in command:
            problems.append(f"{where}: {probe} does not check that Redis answers PING")
    redis_service = next(
        (s for s in m.all("Service") if s["spec"]["ports"][0]["port"] == 6379), None
    )  # fmt: skip
    if (
        redis_service is None
        or f"@{redis_service['metadata']['name']}:6379/" not in m.config()["state"]["url"]
    ):
        problems.append("state.url does not name the Redis Service")
    return problems


def only_the_proxy_reaches_redis(m: Manifest) -> list[str]:
    if m.config().get("state", {}).get("backend") != "redis":
        return []
    workload, _, _ = m.proxy_pod()
    proxy_labels = workload["spec"]["template"]["metadata"]["labels"]
    redis_workload = next(
        w
        for w in m.workloads()
        if any("redis" in c["image"] for c in w["spec"]["template"]["spec"]["containers"])
    )
    redis_labels = redis_workload["spec"]["template"]["metadata"]["labels"]
    policies = [
        p for p in m.all("NetworkPolicy")
        if p["spec"]["podSelector"].get("matchLabels")
        and p["spec"]["podSelector"]["matchLabels"].items() <= redis_labels.items()
    ]  # fmt: skip
    if not policies:
        return ["no NetworkPolicy selects the Redis pods"]
    problems = []
    for policy in policies:
        spec = policy["spec"]
        if "Ingress" not in spec.get("policyTypes", []):
            problems.append(f"NetworkPolicy {policy['metadata']['name']} does not restrict ingress")
        for rule in spec.get("ingress", []):
            peers = rule.get("from") or [{}]  # a rule without `from` admits every source
            for peer in peers:
                labels = peer.get("podSelector", {}).get("matchLabels")
                if set(peer) != {"podSelector"} or not labels or not labels.items() <= proxy_labels.items():
                    problems.append(f"NetworkPolicy admits {peer or 'everyone'}, not only the proxy's pods")
                elif labels.items() <= redis_labels.items():
                    problems.append("NetworkPolicy's proxy selector also matches the Redis pods")
            if [p.get("port") for p in rule.get("ports", [])] != [6379]:
                problems.append("NetworkPolicy admits ports other than 6379")
    return problems


def replicas_stay_available(m: Manifest) -> list[str]:
    workload, pod, _ = m.proxy_pod()
    if workload["spec"].get("replicas", 1) < 2:
        return []
    labels = workload["spec"]["template"]["metadata"]["labels"]
    problems = []
    budgets = [
        b for b in m.all("PodDisruptionBudget")
        if b["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ]  # fmt: skip
    if not budgets:
        problems.append("no PodDisruptionBudget covers the proxy replicas")
    for budget in budgets:
        if budget["spec"].get("minAvailable", 0) >= workload["spec"]["replicas"]:
            problems.append("the PodDisruptionBudget allows no disruption at all (drains would hang)")
    spread = pod.get("topologySpreadConstraints", [])
    if not any(
        c["topologyKey"] == "kubernetes.io/hostname"
        and c["labelSelector"]["matchLabels"].items() <= labels.items()
        for c in spread
    ):
        problems.append("no topologySpreadConstraints spread the replicas across nodes")
    ingresses = m.all("Ingress")
    if not ingresses:
        problems.append("no Ingress")
    for ingress in ingresses:
        hosts = {rule["host"] for rule in ingress["spec"]["rules"]}
        tls_hosts = {
            h for tls in ingress["spec"].get("tls", []) if tls.get("secretName") for h in tls["hosts"]
        }
        if not hosts <= tls_hosts:
            problems.append(f"Ingress serves {sorted(hosts - tls_hosts)} without TLS")
        annotations = ingress["metadata"].get("annotations", {})
        if annotations.get("nginx.ingress.kubernetes.io/upstream-hash-by") != "$http_mcp_session_id":
            problems.append("the Ingress does not hash by Mcp-Session-Id (session affinity)")
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                if path["backend"]["service"]["name"] != workload["metadata"]["name"]:
                    problems.append("the Ingress does not route to the proxy's Service")
    return problems


MANIFEST_RULES: dict[str, Callable[[Manifest], list[str]]] = {
    rule.__name__: rule
    for rule in (
        no_inline_credentials,
        secrets_are_created_by_documented_commands,
        only_asymmetric_issuers,
        containers_are_locked_down,
        containers_are_probed_and_bounded,
        proxy_writes_only_to_volumes,
        shutdown_is_graceful,
        proxy_is_wired,
        metrics_are_scraped_on_their_own_port,
        redis_keeps_sessions,
        only_the_proxy_reaches_redis,
        replicas_stay_available,
    )
}


@pytest.mark.parametrize("rule", MANIFEST_RULES)
@pytest.mark.parametrize("name", MANIFESTS)
def test_the_manifest_follows_the_rule(name: str, rule: str) -> None:
    assert MANIFEST_RULES[rule](Manifest.load(name)) == []


def test_the_replicas_example_has_what_the_replica_rules_look_for() -> None:
    m = Manifest.load("kubernetes-replicas.yaml")  # so redis and availability rules are not vacuous
    assert m.proxy_pod()[0]["spec"]["replicas"] > 1
    assert m.config()["state"]["backend"] == "redis"
    assert {"PodDisruptionBudget", "NetworkPolicy", "Ingress"} <= {d["kind"] for d in m.docs}


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_document_parses_and_is_named(name: str) -> None:
    docs = Manifest.load(name).docs
    assert docs
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"]
    assert not [d for d in docs if d["kind"] == "Secret"]  # created by the documented commands


@pytest.mark.parametrize("name", MANIFESTS)
def test_the_embedded_config_and_policies_pass_check_config(tmp_path: Path, name: str) -> None:
    result = check_config(Manifest.load(name), tmp_path)
    assert result.returncode == 0, result.stderr
    assert "(2 tenants, 1 issuers)" in result.stdout


def check_config(m: Manifest, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    for path, text in m.config_files().items():  # lay the files out as the kubelet mounts them
        target = tmp_path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    _, _, proxy = m.proxy_pod()
    # Only the environment the container gets (secrets faked), so a ${VAR} it lacks fails here.
    env = {"PATH": os.environ.get("PATH", ""), **env_of(m, proxy)}
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "--config", str(tmp_path / "config.yaml")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip


def test_check_config_refuses_a_key_the_proxy_does_not_have(tmp_path: Path) -> None:
    m = Manifest.load("kubernetes.yaml")
    data = copy.deepcopy(m.docs)
    config_map = next(d for d in data if d["kind"] == "ConfigMap")
    config_map["data"]["config.yaml"] = config_map["data"]["config.yaml"].replace(
        "  port: 8080\n", "  port: 8080\n  drain_seconds: 5\n"
    )
    result = check_config(replace(m, docs=tuple(data)), tmp_path)
    assert result.returncode == 2
    assert "listen.drain_seconds: unknown key" in result.stderr


# --- breakages each rule must catch -------------------------------------------------------------------

Docs = list[dict[str, Any]]


@dataclass(frozen=True)
class Breakage:
    manifest: str
    rule: str
    what: str
    change: Callable[[Docs], object] | None = None  # edits the parsed documents in place
    text: tuple[str, str] | None = None  # or replaces this text of the file with that

    def apply(self, m: Manifest) -> Manifest:
        if self.text is not None:
            old, new = self.text
            assert old in m.text
            return replace(m, text=m.text.replace(old, new))
        docs = copy.deepcopy(list(m.docs))
        assert self.change is not None
        self.change(docs)
        return replace(m, docs=tuple(docs))


def doc(docs: Docs, kind: str, name: str | None = None) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"]))


def pod(docs: Docs, workload: str = PROXY_CONTAINER) -> dict[str, Any]:
    spec: dict[str, Any] = doc(docs, "Deployment", workload)["spec"]["template"]["spec"]
    return spec


def box(docs: Docs, name: str) -> dict[str, Any]:
    """The container called `name`."""
    for workload in docs:
        if workload["kind"] in WORKLOAD_KINDS:
            containers: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
            for container in containers:
                if container["name"] == name:
                    return container
    raise KeyError(name)


def config(docs: Docs, change: Callable[[dict[str, Any]], object]) -> None:
    """Edit the embedded config.yaml."""
    data = doc(docs, "ConfigMap")["data"]
    parsed = yaml.safe_load(data["config.yaml"])
    change(parsed)
    data["config.yaml"] = yaml.safe_dump(parsed)


def swap_arg(container: dict[str, Any], old: str, new: str | None) -> None:
    args = container["args"]
    index = args.index(old)
    args[index : index + 1] = [] if new is None else [new]


def drop_args(container: dict[str, Any], *dropped: str) -> None:
    for arg in dropped:
        swap_arg(container, arg, None)


def lock_down(docs: Docs, container: str, key: str, value: object) -> None:
    box(docs, container)["securityContext"][key] = value


SIDECAR, REPLICAS = MANIFESTS
INLINE_SECRET = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}, "stringData": {"A": "b"}}
HS_ISSUER = {"issuer": "dev", "algorithms": ["HS256"], "secret_env": "DEV_SECRET", "tenant_claim": "tenant"}
LOOSENED = [
    ("allowPrivilegeEscalation", True), ("readOnlyRootFilesystem", False), ("runAsNonRoot", False),
    ("capabilities", {"drop": ["ALL"], "add": ["NET_ADMIN"]}), ("capabilities", None),
    ("seccompProfile", {"type": "Unconfined"}), ("runAsUser", 0), ("runAsGroup", "redis"),
]  # fmt: skip
PROXY, MCP_SERVER, REDIS = PROXY_CONTAINER, "mcp-server", "redis"

# fmt: off
BREAKAGES = [
    Breakage(SIDECAR, "no_inline_credentials", "a Secret with stringData", lambda d: d.append(INLINE_SECRET)),
    Breakage(REPLICAS, "no_inline_credentials", "an inline password variable",
             lambda d: box(d, REDIS)["env"].append({"name": "REDIS_PASSWORD", "value": "x"})),
    Breakage(SIDECAR, "no_inline_credentials", "an inline upstream token", lambda d: config(
        d, lambda c: c["tenants"]["acme"]["upstream"].update(headers={"Authorization": "Bearer abc"}))),
    Breakage(REPLICAS, "no_inline_credentials", "a password in state.url", lambda d: config(
        d, lambda c: c["state"].update(url="redis://:hunter2@mcp-tenant-proxy-redis:6379/0"))),
    Breakage(SIDECAR, "secrets_are_created_by_documented_commands", "an undocumented Secret",
             lambda d: box(d, PROXY)["envFrom"].append({"secretRef": {"name": "other"}})),
    Breakage(REPLICAS, "secrets_are_created_by_documented_commands", "an undocumented key",
             text=("--from-literal=REDIS_PASSWORD=", "--from-literal=REDIS_PASS=")),
    Breakage(REPLICAS, "secrets_are_created_by_documented_commands", "an undocumented TLS Secret",
             lambda d: doc(d, "Ingress")["spec"]["tls"][0].update(secretName="other-tls")),
    Breakage(SIDECAR, "secrets_are_created_by_documented_commands", "a command the README lacks",
             text=("UPSTREAM_TOKEN=./upstream-token", "UPSTREAM_TOKEN=./other-file")),
    Breakage(SIDECAR, "only_asymmetric_issuers", "an HS256 dev issuer",
             lambda d: config(d, lambda c: c["auth"]["issuers"].append(HS_ISSUER))),
    *[
        Breakage(manifest, "containers_are_locked_down", f"{container} {key} {value}",
                 partial(lock_down, container=container, key=key, value=value))
        for manifest, container in ((SIDECAR, MCP_SERVER), (SIDECAR, PROXY), (REPLICAS, REDIS))
        for key, value in LOOSENED
    ],
    Breakage(REPLICAS, "containers_are_locked_down", "no securityContext",
             lambda d: box(d, PROXY).pop("securityContext")),
    Breakage(SIDECAR, "containers_are_probed_and_bounded", "an MCP server without liveness probe",
             lambda d: box(d, MCP_SERVER).pop("livenessProbe")),
    Breakage(SIDECAR, "containers_are_probed_and_bounded", "an MCP server without readiness probe",
             lambda d: box(d, MCP_SERVER).pop("readinessProbe")),
    Breakage(SIDECAR, "containers_are_probed_and_bounded", "an MCP server without resources",
             lambda d: box(d, MCP_SERVER).pop("resources")),
    Breakage(REPLICAS, "containers_are_probed_and_bounded", "an unprobed Redis",
             lambda d: box(d, REDIS).pop("readinessProbe")),
    Breakage(SIDECAR, "proxy_writes_only_to_volumes", "audit on the read-only root",
             lambda d: config(d, lambda c: c["audit"].update(dir="/var/audit"))),
    Breakage(SIDECAR, "proxy_writes_only_to_volumes", "a read-only audit mount",
             lambda d: box(d, PROXY)["volumeMounts"][1].update(readOnly=True)),
    Breakage(REPLICAS, "proxy_writes_only_to_volumes", "audit under the config mount",
             lambda d: config(d, lambda c: c["audit"].update(dir="audit"))),
    Breakage(SIDECAR, "shutdown_is_graceful", "no drain delay",
             lambda d: config(d, lambda c: c["listen"].update(drain_delay_seconds=0))),
    Breakage(REPLICAS, "shutdown_is_graceful", "a preStop sleep on top of the drain delay",
             lambda d: box(d, PROXY).update(lifecycle={"preStop": {"sleep": {"seconds": 15}}})),
    Breakage(REPLICAS, "shutdown_is_graceful", "a grace period shorter than the drain",
             lambda d: pod(d).update(terminationGracePeriodSeconds=15)),
    Breakage(REPLICAS, "shutdown_is_graceful", "a longer shutdown_grace_seconds",
             lambda d: config(d, lambda c: c["listen"].update(shutdown_grace_seconds=25))),
    Breakage(SIDECAR, "shutdown_is_graceful", "an MCP server stopping first",
             lambda d: box(d, MCP_SERVER).pop("lifecycle")),
    Breakage(SIDECAR, "shutdown_is_graceful", "an MCP server stopping before the proxy's last second",
             lambda d: box(d, MCP_SERVER)["lifecycle"]["preStop"]["sleep"].update(seconds=15)),
    Breakage(SIDECAR, "proxy_is_wired", "readiness on /healthz",
             lambda d: box(d, PROXY)["readinessProbe"]["httpGet"].update(path="/healthz")),
    Breakage(REPLICAS, "proxy_is_wired", "liveness on /readyz",
             lambda d: box(d, PROXY)["livenessProbe"]["httpGet"].update(path="/readyz")),
    Breakage(REPLICAS, "proxy_is_wired", "a subPath config mount",
             lambda d: box(d, PROXY)["volumeMounts"][0].update(subPath="config.yaml")),
    Breakage(SIDECAR, "metrics_are_scraped_on_their_own_port", "scraping the public port",
             lambda d: doc(d, "Deployment", "notes-mcp")["spec"]["template"]["metadata"]["annotations"]
             .update({"prometheus.io/port": "8080"})),
    Breakage(REPLICAS, "metrics_are_scraped_on_their_own_port", "metrics.public",
             lambda d: config(d, lambda c: c["metrics"].update(public=True))),
    Breakage(REPLICAS, "metrics_are_scraped_on_their_own_port", "a loopback metrics listener",
             lambda d: config(d, lambda c: c["metrics"]["listen"].update(host="127.0.0.1"))),
    Breakage(SIDECAR, "metrics_are_scraped_on_their_own_port", "no metrics container port",
             lambda d: box(d, PROXY)["ports"].pop()),
    Breakage(REPLICAS, "metrics_are_scraped_on_their_own_port", "a listener on another port",
             lambda d: config(d, lambda c: c["metrics"]["listen"].update(port=9100))),
    Breakage(REPLICAS, "metrics_are_scraped_on_their_own_port", "a Service exposing metrics",
             lambda d: doc(d, "Service", "mcp-tenant-proxy")["spec"]["ports"].append(
                 {"name": "metrics", "port": 9464, "targetPort": "metrics"})),
    Breakage(REPLICAS, "metrics_are_scraped_on_their_own_port", "no scrape annotation",
             lambda d: doc(d, "Deployment", "mcp-tenant-proxy")["spec"]["template"]["metadata"].pop(
                 "annotations")),
    Breakage(REPLICAS, "redis_keeps_sessions", "volatile-ttl eviction",
             lambda d: swap_arg(box(d, REDIS), "noeviction", "volatile-ttl")),
    Breakage(REPLICAS, "redis_keeps_sessions", "no eviction policy",
             lambda d: drop_args(box(d, REDIS), "--maxmemory-policy", "noeviction")),
    Breakage(REPLICAS, "redis_keeps_sessions", "redis:7-alpine",
             lambda d: box(d, REDIS).update(image="redis:7-alpine")),
    Breakage(REPLICAS, "redis_keeps_sessions", "redis:latest",
             lambda d: box(d, REDIS).update(image="redis:latest")),
    Breakage(REPLICAS, "redis_keeps_sessions", "a digest placeholder",
             lambda d: box(d, REDIS).update(image="redis:7.4.9-alpine@sha256:<digest>")),
    Breakage(REPLICAS, "redis_keeps_sessions", "no password",
             lambda d: drop_args(box(d, REDIS), "--requirepass", "$(REDIS_PASSWORD)")),
    Breakage(REPLICAS, "redis_keeps_sessions", "a TCP-only probe",
             lambda d: box(d, REDIS).update(livenessProbe={"tcpSocket": {"port": 6379}})),
    Breakage(REPLICAS, "only_the_proxy_reaches_redis", "no NetworkPolicy",
             lambda d: d.remove(doc(d, "NetworkPolicy"))),
    Breakage(REPLICAS, "only_the_proxy_reaches_redis", "ingress from everyone",
             lambda d: doc(d, "NetworkPolicy")["spec"]["ingress"][0].pop("from")),
    Breakage(REPLICAS, "only_the_proxy_reaches_redis", "ingress from an address block",
             lambda d: doc(d, "NetworkPolicy")["spec"]["ingress"][0]["from"].append({"ipBlock": {}})),
    Breakage(REPLICAS, "only_the_proxy_reaches_redis", "ingress from other pods",
             lambda d: doc(d, "NetworkPolicy")["spec"]["ingress"][0]["from"][0].update(podSelector={})),
    Breakage(REPLICAS, "only_the_proxy_reaches_redis", "a policy on other pods",
             lambda d: doc(d, "NetworkPolicy")["spec"].update(podSelector={"matchLabels": {"app": "x"}})),
    Breakage(REPLICAS, "only_the_proxy_reaches_redis", "no ingress restriction",
             lambda d: doc(d, "NetworkPolicy")["spec"].update(policyTypes=["Egress"])),
    Breakage(REPLICAS, "replicas_stay_available", "no PodDisruptionBudget",
             lambda d: d.remove(doc(d, "PodDisruptionBudget"))),
    Breakage(REPLICAS, "replicas_stay_available", "a budget allowing no disruption",
             lambda d: doc(d, "PodDisruptionBudget")["spec"].update(minAvailable=3)),
    Breakage(REPLICAS, "replicas_stay_available", "no topology spread",
             lambda d: pod(d).pop("topologySpreadConstraints")),
    Breakage(REPLICAS, "replicas_stay_available", "no ingress TLS",
             lambda d: doc(d, "Ingress")["spec"].pop("tls")),
    Breakage(REPLICAS, "replicas_stay_available", "no session affinity",
             lambda d: doc(d, "Ingress")["metadata"]["annotations"].clear()),
]
# fmt: on


@pytest.mark.parametrize("breakage", [pytest.param(b, id=f"{b.rule}: {b.what}") for b in BREAKAGES])
def test_a_rule_catches_its_breakage(breakage: Breakage) -> None:
    rule, shipped = MANIFEST_RULES[breakage.rule], Manifest.load(breakage.manifest)
    assert set(rule(breakage.apply(shipped))) - set(rule(shipped))


def test_every_rule_is_shown_to_catch_a_breakage() -> None:
    assert {b.rule for b in BREAKAGES} == set(MANIFEST_RULES)
    assert {rule for rule, _, _ in DOCKER_BREAKAGES} == set(DOCKER_RULES)


# --- the image --------------------------------------------------------------------------------------


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    lines = [line for line in dockerfile.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            result.append((word.upper(), " ".join(rest.split())))
    return result


def stages(dockerfile: str) -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for instruction in instructions(dockerfile):
        if instruction[0] == "FROM":
            found.append([])
        found[-1].append(instruction)
    return found


def base_images_pinned(dockerfile: str, lock: str) -> list[str]:
    problems = []
    for _, image in (i for i in instructions(dockerfile) if i[0] == "FROM"):
        image = image.split(" AS ")[0].split(" as ")[0]
        if not re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", image):
            problems.append(f"FROM {image} is not pinned to a release (x.y.z)")
    return problems


def dependencies_install_from_the_lock_before_the_code(dockerfile: str, lock: str) -> list[str]:
    build = stages(dockerfile)[0]
    copies = [(i, args) for i, (word, args) in enumerate(build) if word == "COPY"]
    lock_copy = next((i for i, args in copies if "deploy/requirements.lock" in args), None)
    code_copy = next((i for i, args in copies if re.search(r"(^| )proxy( |$)", args)), None)
    if lock_copy is None or code_copy is None or lock_copy > code_copy:
        return ["the lock file is not copied before the code"]
    sources = build[lock_copy][1].split()[:-1]
    problems = []
    if set(sources) - {"pyproject.toml", "deploy/requirements.lock"}:
        problems.append(f"the dependency layer copies more than pyproject.toml and the lock: {sources}")
    installs = [args for word, args in build[lock_copy:code_copy] if word == "RUN" and "pip install" in args]
    if not any(
        "--require-hashes" in args and "--no-deps" in args and re.search(r"-r \S*requirements\.lock", args)
        for args in installs
    ):
        problems.append("no `pip install --require-hashes --no-deps -r requirements.lock` before the code")
    if not any(
        word == "RUN" and re.search(r"pip install [^&]*--no-deps[^&]* \.( |$)", args)
        for word, args in build[code_copy:]
    ):
        problems.append("the project is not installed with `pip install --no-deps .` after the code")
    return problems


def runs_as_a_numeric_user(dockerfile: str, lock: str) -> list[str]:
    users = [args for word, args in stages(dockerfile)[-1] if word == "USER"]
    if not users or not re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]):
        return [f"the final stage's USER is not a numeric non-root id: {users}"]
    return []


def final_image_has_no_build_tools(dockerfile: str, lock: str) -> list[str]:
    final = stages(dockerfile)[-1]
    problems = [
        f"the final stage runs `{args}`"
        for word, args in final
        if word == "RUN" and re.search(r"apt-get|apk |gcc|build-essential|pip install", args)
    ]
    if not any(word == "COPY" and "--from=" in args for word, args in final):
        problems.append("the final stage does not copy the built environment from the build stage")
    return problems


def lock_pins_every_package_with_hashes(dockerfile: str, lock: str) -> list[str]:
    problems = []
    entries = re.sub(r"\\\n\s*", " ", re.sub(r"(?m)^\s*#.*\n", "", lock)).splitlines()
    pinned: dict[str, str] = {}
    for entry in filter(str.strip, entries):
        pin, *hashes = entry.split(" --hash=")
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([\w.+!-]+)( ; .+)?", pin.strip())
        if not match:
            problems.append(f"not an exact pin: {pin.strip()}")
            continue
        if not hashes or not all(re.fullmatch(r"sha256:[0-9a-f]{64}", h.strip()) for h in hashes):
            problems.append(f"{match.group(1)} has no sha256 hashes")
        pinned[match.group(1).lower().replace("_", "-")] = match.group(2)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = [
        *project["project"]["dependencies"],
        *project["project"]["optional-dependencies"]["redis"],
        *project["project"]["optional-dependencies"]["speed"],
        *project["build-system"]["requires"],  # the image builds the project without fetching
    ]
    for line in wanted:
        requirement = Requirement(line)
        name = requirement.name.lower().replace("_", "-")
        if name not in pinned:
            problems.append(f"{name} (pyproject.toml) is not in the lock")
        elif not requirement.specifier.contains(pinned[name], prereleases=True):
            problems.append(f"{name}=={pinned[name]} does not satisfy {line!r}: regenerate the lock")
    return problems


DOCKER_RULES: dict[str, Callable[[str, str], list[str]]] = {
    rule.__name__: rule
    for rule in (
        base_images_pinned,
        dependencies_install_from_the_lock_before_the_code,
        runs_as_a_numeric_user,
        final_image_has_no_build_tools,
        lock_pins_every_package_with_hashes,
    )
}


def dockerfile_and_lock() -> tuple[str, str]:
    return (DEPLOY / "Dockerfile").read_text(), (DEPLOY / "requirements.lock").read_text()


@pytest.mark.parametrize("rule", DOCKER_RULES)
def test_the_image_follows_the_rule(rule: str) -> None:
    assert DOCKER_RULES[rule](*dockerfile_and_lock()) == []


def swap(old: str, new: str, in_lock: bool = False) -> Callable[[str, str], tuple[str, str]]:
    def edit(dockerfile: str, lock: str) -> tuple[str, str]:
        text = lock if in_lock else dockerfile
        assert old in text, old
        text = text.replace(old, new, 1)
        return (dockerfile, text) if in_lock else (text, lock)

    return edit


def drop_from_lock(package: str) -> Callable[[str, str], tuple[str, str]]:
    def edit(dockerfile: str, lock: str) -> tuple[str, str]:
        edited = re.sub(rf"(?m)^{package}==.*\\\n(\s+--hash=\S+( \\)?\n)+", "", lock)
        assert edited != lock
        return dockerfile, edited

    return edit


CODE_COPY = "COPY proxy ./proxy\n"
DEPS_COPY = "COPY pyproject.toml deploy/requirements.lock ./\n"
VENV_COPY = "COPY --from=build /opt/venv /opt/venv\n"

# fmt: off
DOCKER_BREAKAGES: list[tuple[str, str, Callable[[str, str], tuple[str, str]]]] = [
    ("base_images_pinned", "python:3.11-slim", swap("3.11.15-slim-bookworm AS", "3.11-slim AS")),
    ("base_images_pinned", "python:latest", swap("python:3.11.15-slim-bookworm\n", "python:latest\n")),
    ("dependencies_install_from_the_lock_before_the_code", "the code first",
     lambda d, lock: (d.replace(CODE_COPY, "").replace(DEPS_COPY, CODE_COPY + DEPS_COPY), lock)),
    ("dependencies_install_from_the_lock_before_the_code", "everything copied at once",
     swap(DEPS_COPY, "COPY . ./\n")),
    ("dependencies_install_from_the_lock_before_the_code", "the README in the dependency layer",
     swap(DEPS_COPY, "COPY pyproject.toml README.md deploy/requirements.lock ./\n")),
    ("dependencies_install_from_the_lock_before_the_code", "no --require-hashes",
     swap("--require-hashes ", "")),
    ("dependencies_install_from_the_lock_before_the_code", "dependencies resolved with the project",
     swap("pip install --no-deps --no-build-isolation --no-index .", "pip install .")),
    ("runs_as_a_numeric_user", "a user name", swap("USER 10001:10001", "USER proxy")),
    ("runs_as_a_numeric_user", "root", swap("USER 10001:10001", "USER 0")),
    ("runs_as_a_numeric_user", "no USER", swap("USER 10001:10001\n", "")),
    ("final_image_has_no_build_tools", "a compiler",
     swap(VENV_COPY, VENV_COPY + "RUN apt-get update && apt-get install -y gcc\n")),
    ("final_image_has_no_build_tools", "nothing from the build stage", swap(VENV_COPY, "")),
    ("lock_pins_every_package_with_hashes", "a range", swap("\naiohttp==", "\naiohttp>=", in_lock=True)),
    ("lock_pins_every_package_with_hashes", "no hashes", lambda d, lock: (
        d, re.sub(r"(?m)^(pyyaml==\S+) \\\n(\s+--hash=\S+( \\)?\n)+", r"\1\n", lock))),
    ("lock_pins_every_package_with_hashes", "hiredis missing", drop_from_lock("hiredis")),
    ("lock_pins_every_package_with_hashes", "uvloop missing", drop_from_lock("uvloop")),
    ("lock_pins_every_package_with_hashes", "setuptools missing", drop_from_lock("setuptools")),
    ("lock_pins_every_package_with_hashes", "a pin pyproject.toml excludes",
     lambda d, lock: (d, re.sub(r"(?m)^aiohttp==\S+", "aiohttp==3.9.0", lock))),
]
# fmt: on


@pytest.mark.parametrize(
    ("rule", "breakage"),
    [pytest.param(rule, breakage, id=f"{rule}-{what}") for rule, what, breakage in DOCKER_BREAKAGES],
)
def test_an_image_rule_catches_its_breakage(
    rule: str, breakage: Callable[[str, str], tuple[str, str]]
) -> None:
    shipped = dockerfile_and_lock()
    assert set(DOCKER_RULES[rule](*breakage(*shipped))) - set(DOCKER_RULES[rule](*shipped))
