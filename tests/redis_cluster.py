"""A real Redis Cluster on loopback: three masters (no replicas), for the cluster tests.

Each master is a `redis-server --cluster-enabled yes` with its own port, cluster bus port and
nodes file in a temp directory; `redis-cli --cluster create` assigns the 16,384 slots. No
persistence: a master killed and started again (same ports, same nodes file) rejoins the cluster
with its slots and no data, as after a crash. Tests skip when redis-server (7 or later) or
redis-cli is missing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.redis_server import RedisServer, require_redis_server
from tests.upstreams import free_port


def require_redis_cli() -> str:
    binary = shutil.which("redis-cli")
    if binary is None:
        pytest.skip("redis-cli is not installed (run tests/install-redis-server)")
    return binary


def require_cluster_port(server: str) -> None:
    """`--cluster-port` (a bus port of our choosing, not port + 10000) came with Redis 7."""
    answer = subprocess.run([server, "--version"], capture_output=True, text=True, timeout=10).stdout
    found = re.search(r"v=(\d+)\.", answer)
    if found is None or int(found.group(1)) < 7:
        pytest.skip(f"the cluster tests need redis-server 7 or later ({answer.strip()})")


@dataclass
class ClusterNode(RedisServer):
    directory: Path = Path()
    bus_port: int = field(default_factory=free_port)

    def arguments(self) -> list[str]:
        return [
            "--cluster-enabled", "yes",
            "--cluster-port", str(self.bus_port),  # not port + 10000: that may not be free
            "--cluster-config-file", str(self.directory / f"nodes-{self.port}.conf"),
            # A killed master is marked failed within about this long; back, it serves again
            # within twice this long (a master with slots and no replica to fail over to).
            "--cluster-node-timeout", "2000",
            "--dir", str(self.directory),
        ]  # fmt: skip


@dataclass
class RedisCluster:
    """Three masters on loopback; `url` is what `state.url` names (any one node finds the rest)."""

    cli: str
    nodes: list[ClusterNode]

    @classmethod
    def create(cls, directory: Path) -> RedisCluster:
        server, cli = require_redis_server(), require_redis_cli()
        require_cluster_port(server)
        nodes = [ClusterNode(server, directory=directory) for _ in range(3)]
        cluster = cls(cli, nodes)
        try:
            for node in nodes:
                node.start()
            subprocess.run(
                [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
                 "--cluster-replicas", "0", "--cluster-yes"],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            cluster.wait_until_ok()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def info(self, node: ClusterNode) -> dict[str, str]:
        answer = subprocess.run(
            [self.cli, "-p", str(node.port), "cluster", "info"], capture_output=True, text=True, timeout=10
        )
        pairs = (line.split(":", 1) for line in answer.stdout.splitlines() if ":" in line)
        return {key: value.strip() for key, value in pairs}

    def slots(self, node: ClusterNode) -> list[tuple[int, int]]:
        """The slot ranges a master serves, as a live node of the cluster knows them."""
        asked = next(n for n in self.nodes if n.process is not None)
        answer = subprocess.run(
            [self.cli, "-p", str(asked.port), "cluster", "nodes"], capture_output=True, text=True, timeout=10
        )
        for line in answer.stdout.splitlines():
            fields = line.split()
            if len(fields) > 1 and fields[1].startswith(f"127.0.0.1:{node.port}@"):
                ranges = [part.split("-") for part in fields[8:] if not part.startswith("[")]
                return [(int(r[0]), int(r[-1])) for r in ranges]
        return []

    def wait_until_ok(self, timeout: float = 30.0) -> None:
        """Every master says the cluster is ok (slots covered, nodes agree on the configuration)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.info(node).get("cluster_state") == "ok" for node in self.nodes):
                return
            time.sleep(0.05)
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")

    def wait_until_failed(self, timeout: float = 30.0) -> None:
        """The surviving masters have marked the cluster failed (a master's slots are unserved)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = [node for node in self.nodes if node.process is not None]
            if all(self.info(node).get("cluster_state") == "fail" for node in alive):
                return
            time.sleep(0.05)
        raise RuntimeError("the Redis Cluster did not notice the lost master")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
