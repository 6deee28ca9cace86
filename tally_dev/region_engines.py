"""The throwaway engines and Tally processes of ``tally_dev.engines``, run inside a region's
network namespace and listening on the region's address instead of loopback.

A process is started as ``ip netns exec <ns> <command>`` (``ip`` execs the command, so the pid
is the server's); PostgreSQL, which must not run as root, is then handed to its unprivileged user
by ``setpriv`` inside the namespace, since ``ip netns exec`` itself needs root.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from tally_dev.engine_bins import nats_bin, pg_bin, require_binary
from tally_dev.engines import (
    Engine,
    EngineError,
    NatsEngine,
    PostgresEngine,
    RedisEngine,
    http_ok,
)
from tally_dev.ha import ETCD_INSTALL, EtcdEngine, etcd_bin
from tally_dev.netns import RegionNet


def _open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


class NetPostgres(PostgresEngine):
    def __init__(self, root: Path, port: int, net: RegionNet, region: str) -> None:
        self.host = net.address(region)
        self.prefix = net.exec_prefix(region)
        super().__init__(root, port, settings={"listen_addresses": f"'{self.host}'"})
        self._launching = False

    def _prepare(self) -> None:
        super()._prepare()
        hba = self.data / "pg_hba.conf"
        rule = "host all all 10.250.0.0/16 scram-sha-256\n"
        if rule not in hba.read_text():
            with open(hba, "a") as fh:
                fh.write(rule)  # clients reach it over the regions' bridge

    def _command(self) -> list[str]:
        self._launching = True  # evaluated just before the Popen's keyword arguments
        postgres = [str(require_binary("postgres", pg_bin("postgres"))), "-D", str(self.data),
                    "-p", str(self.port)]
        u = self._os_user
        if u is None:
            return [*self.prefix, *postgres]
        return [*self.prefix, "setpriv", f"--reuid={u.pw_uid}", f"--regid={u.pw_gid}",
                "--clear-groups", *postgres]

    def _popen_kwargs(self) -> dict[str, Any]:
        if self._launching and self._os_user is not None:
            self._launching = False
            return {"env": {"PATH": os.environ.get("PATH", ""), "HOME": str(self.root),
                            "LC_ALL": "C"}}
        return super()._popen_kwargs()

    def _ready(self) -> bool:
        return "ready to accept connections" in self.log_since_start() and _open(self.host,
                                                                                self.port)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        psql = require_binary("postgres", pg_bin("psql"))
        env = {**os.environ, "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "10"}
        done = subprocess.run([str(psql), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                               "-h", self.host, "-p", str(self.port), "-U", self.user,
                               "-d", database, "-c", sql],
                              capture_output=True, text=True, env=env, timeout=60)
        if done.returncode != 0:
            raise EngineError(f"psql failed: {done.stderr.strip()}")
        return done.stdout


class NetNats(NatsEngine):
    """JetStream in a domain named after the region; region ``hub`` listens for leaf nodes, the
    others connect to it as leaves (a leaf-node graph must not have cycles)."""

    def __init__(self, root: Path, port: int, monitor_port: int, leaf_port: int, net: RegionNet,
                 region: str, hub: str) -> None:
        """``leaf_port``: the hub's leaf-node port (the hub listens on it, the others dial it)."""
        super().__init__(root, port, monitor_port)
        self.host = net.address(region)
        self.prefix = net.exec_prefix(region)
        self.region = region
        self.leaf = ("listen", f"{self.host}:{leaf_port}") if region == hub else (
            "remote", f"nats-leaf://{net.address(hub)}:{leaf_port}")

    def _prepare(self) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        kind, where = self.leaf
        leaf = (f"leafnodes {{\n  listen: {where}\n}}\n" if kind == "listen" else
                f"leafnodes {{\n  reconnect: 1\n  remotes: [{{ url: {where!r} }}]\n}}\n")
        self.config.write_text(
            f"server_name: {self.region}\nlisten: {self.host}:{self.port}\n"
            f"http: {self.host}:{self.monitor_port}\nping_interval: 2s\nping_max: 2\n"
            f"jetstream {{\n  store_dir: {str(self.store)!r}\n  domain: {self.region}\n"
            f"  sync_interval: {self.sync_interval}\n}}\n{leaf}")

    def _command(self) -> list[str]:
        return [*self.prefix, str(require_binary("nats", nats_bin())), "-c", str(self.config)]

    def _ready(self) -> bool:
        return http_ok(f"http://{self.host}:{self.monitor_port}/healthz?js-enabled-only=true")

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"


class NetNatsHub(NatsEngine):
    """The leaf-node hub when it is no region: a NATS server without JetStream in a place of its
    own (the witness's), every region's NATS a leaf of it. Leaf-node graphs must be trees, so
    with the hub in a region, that region's loss cuts replication between the others; a hub
    outside the regions survives the loss of any region (not its own loss)."""

    def __init__(self, root: Path, port: int, monitor_port: int, leaf_port: int, net: RegionNet,
                 place: str) -> None:
        super().__init__(root, port, monitor_port)
        self.name = f"nats-{place}"
        self.host = net.address(place)
        self.prefix = net.exec_prefix(place)
        self.leaf_port = leaf_port

    def _prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            f"server_name: hub\nlisten: {self.host}:{self.port}\n"
            f"http: {self.host}:{self.monitor_port}\nping_interval: 2s\nping_max: 2\n"
            f"leafnodes {{\n  listen: {self.host}:{self.leaf_port}\n}}\n")

    def _command(self) -> list[str]:
        return [*self.prefix, str(require_binary("nats", nats_bin())), "-c", str(self.config)]

    def _ready(self) -> bool:
        return http_ok(f"http://{self.host}:{self.monitor_port}/healthz")

    def leaves(self) -> int:
        """Leaf nodes connected now (0 when the hub does not answer)."""
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.monitor_port}/leafz",
                                        timeout=2.0) as resp:
                return int(json.loads(resp.read()).get("leafnodes", 0))
        except (OSError, ValueError):
            return 0

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"


class NetRedis(RedisEngine):
    def __init__(self, root: Path, port: int, net: RegionNet, region: str) -> None:
        super().__init__(root, port, appendfsync="everysec")
        self.host = net.address(region)
        self.prefix = net.exec_prefix(region)

    def _command(self) -> list[str]:
        cmd = super()._command()
        cmd[cmd.index("--bind") + 1] = self.host
        # Clients come from the bridge, not loopback; the namespace is reachable from this
        # machine only.
        cmd[cmd.index("--protected-mode") + 1] = "no"
        return [*self.prefix, *cmd]

    def _ready(self) -> bool:
        try:
            return self._send(b"PING").startswith(b"+PONG")
        except OSError:
            return False

    def _send(self, command: bytes) -> bytes:
        with socket.create_connection((self.host, self.port), timeout=2.0) as s:
            s.sendall(command + b"\r\n")
            return s.recv(64)

    def flushall(self) -> None:
        if not self._send(b"FLUSHALL").startswith(b"+OK"):
            raise EngineError("redis FLUSHALL failed")

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"


class NetEtcd(EtcdEngine):
    """One member of the regions' witness quorum (etcd 3.4), in its region's namespace or the
    witness's own; ``members`` maps every member's name to its (address, client port, peer
    port)."""

    def __init__(self, root: Path, member: str, members: dict[str, tuple[str, int, int]],
                 net: RegionNet) -> None:
        self.host, port, _peer = members[member]
        super().__init__(root, member, {m: p for m, (_h, _c, p) in members.items()}, port)
        self.name = f"etcd-{member}"
        self.members = members
        self.prefix = net.exec_prefix(member)

    def _command(self) -> list[str]:
        etcd = etcd_bin()
        if etcd is None:
            raise EngineError(f"etcd not found; install with: {ETCD_INSTALL}")
        peer = f"http://{self.host}:{self.members[self.member][2]}"
        cluster = ",".join(f"{m}=http://{h}:{p}" for m, (h, _c, p) in self.members.items())
        # A fresh data dir joins as "new"; a kept one (recover) ignores these flags.
        return [*self.prefix, str(etcd), "--name", self.member, "--data-dir", str(self.data),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", cluster, "--initial-cluster-state", "new",
                "--initial-cluster-token", "tally-regions", "--heartbeat-interval", "100",
                "--election-timeout", "1000", "--logger", "zap", "--log-outputs", "stderr"]

    def _ready(self) -> bool:
        return _open(self.host, self.port)  # quorum needs the others: see healthy()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class NetTally(Engine):
    """``tally serve --role all`` of one region, in its namespace."""

    def __init__(self, root: Path, port: int, net: RegionNet, region: str, config: Path) -> None:
        super().__init__(root, port)
        self.name = f"tally-{region}"
        self.log_path = self.root / f"{self.name}.log"
        self.host = net.address(region)
        self.prefix = net.exec_prefix(region)
        self.config = config

    def _command(self) -> list[str]:
        return [*self.prefix, sys.executable, "-m", "tally.cli", "serve", "--config",
                str(self.config), "--role", "all", "--host", self.host, "--port", str(self.port)]

    def _popen_kwargs(self) -> dict[str, Any]:
        return {"env": dict(os.environ)}

    def _ready(self) -> bool:
        return http_ok(f"{self.url}/readyz")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"
