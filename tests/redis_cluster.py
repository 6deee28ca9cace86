"""A throwaway Redis Cluster: three ``redis-server --cluster-enabled`` masters joined by redis-cli,
and the session fixture ``redis_cluster`` (loaded by tests/conftest.py)."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tally_dev.engines import HOST, EngineError, RedisEngine


class ClusterNode(RedisEngine):
    """One master: the durable RedisEngine, plus cluster mode with its node file in its own dir."""

    def _command(self) -> list[str]:
        return [*super()._command(), "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.data / "nodes.conf"),
                "--cluster-node-timeout", "2000"]


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    for _ in range(200):
        port = random.randrange(20_000, 55_000)
        if all(_free(p) for p in (port, port + 10_000)):
            return port
    raise EngineError("no free port pair for a Redis Cluster node")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


class RedisCluster:
    """Three masters, no replicas, all 16384 slots assigned; ``url`` names one seed node."""

    def __init__(self, root: str | os.PathLike[str], masters: int = 3) -> None:
        self.nodes = [ClusterNode(Path(root) / f"node{i}", port=cluster_port(),
                                  appendfsync="everysec") for i in range(masters)]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise EngineError("redis: redis-cli not found; install with: apt-get install redis-tools")
        try:
            self._form(cli)
        except BaseException:
            self.stop()  # the nodes already started must not outlive the failure
            raise

    def _form(self, cli: str) -> None:
        for node in self.nodes:
            node.start()
        done = subprocess.run([cli, "--cluster", "create",
                               *(f"{HOST}:{n.port}" for n in self.nodes),
                               "--cluster-replicas", "0", "--cluster-yes"],
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise EngineError(f"redis-cli --cluster create failed: {done.stdout}{done.stderr}")
        for _ in range(100):  # wait until every node agrees the cluster is up
            states = [subprocess.run([cli, "-p", str(n.port), "cluster", "info"],
                                     capture_output=True, text=True, timeout=10).stdout
                      for n in self.nodes]
            if all("cluster_state:ok" in s for s in states):
                return
            time.sleep(0.1)
        raise EngineError("redis cluster did not reach cluster_state:ok")

    def flushall(self) -> None:
        for node in self.nodes:
            node.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(EngineError):
                node.stop()


@pytest.fixture(scope="session")
def redis_cluster(engines_dir: Path) -> Iterator[RedisCluster]:
    from tests.engines import require

    require("redis")
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli not found; install with: apt-get install redis-tools")
    cluster = RedisCluster(engines_dir / "redis-cluster")
    cluster.start()
    yield cluster
    cluster.stop()
