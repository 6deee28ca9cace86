"""The engines of the high-availability topology: etcd members, Patroni-managed PostgreSQL nodes,
and NATS servers joined in one JetStream cluster.

Failover is never decided here. Patroni (PyPI, pinned in the ``ha`` extra) holds each shard's
leader key in etcd (Debian ``etcd-server``) and promotes a standby when the key expires; the
standby streams WAL synchronously (Patroni ``synchronous_mode``) unless asked otherwise. NATS
elects its stream leaders with its own Raft. This module only writes their configuration, starts
them, and reads back what they report (roles, lag, leaders) for ``tally cluster status``.

A Patroni node is two process groups: Patroni's own, and the postmaster it starts (Patroni puts it
in a session of its own so that Patroni's death does not take PostgreSQL down). ``kill()`` sends
SIGKILL to both, the way a machine crash would.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tally_dev.engine_bins import EngineError, pg_bin, require_binary
from tally_dev.engines import HOST, Engine, NatsEngine, PostgresEngine, _listening, free_port

ETCD_INSTALL = "apt-get install etcd-server"
PATRONI_INSTALL = "make install (the `ha` extra: patroni[etcd3])"


def http_json(url: str, timeout_s: float = 2.0) -> tuple[int, Any]:
    """GET a JSON document; (status, body), body None when it is not JSON. Raises OSError."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def etcd_bin() -> Path | None:
    for candidate in ("/usr/bin/etcd", "/usr/local/bin/etcd"):
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def patroni_bin() -> Path | None:
    """Patroni from a virtualenv the unprivileged PostgreSQL user can execute.

    As root, PostgreSQL (so Patroni, which runs it) runs as ``postgres``, which cannot reach an
    interpreter under /root: the Makefile then also installs the ``ha`` extra into ``.venv-ha``
    built on the system Python. ``TALLY_PATRONI`` names another one.
    """
    named = os.environ.get("TALLY_PATRONI")
    candidates = [Path(named)] if named else []
    candidates += [Path(sys.prefix).parent / ".venv-ha" / "bin" / "patroni",
                   Path(sysconfig.get_path("scripts")) / "patroni"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    return None


def missing_ha_binaries() -> list[str]:
    out = []
    if etcd_bin() is None:
        out.append(f"etcd: /usr/bin/etcd not found; install with: {ETCD_INSTALL}")
    if patroni_bin() is None:
        out.append(f"patroni: not found; install with: {PATRONI_INSTALL}")
    return out


# -- etcd ---------------------------------------------------------------------------------------


class EtcdEngine(Engine):
    """One etcd 3.4 member; ``peers`` maps every member's name to its peer port."""

    def __init__(self, root: Path, member: str, peers: dict[str, int],
                 port: int | None = None) -> None:
        super().__init__(root, port)
        self.name = member
        self.member = member
        self.peers = peers
        self.data = self.root / "data"
        self.log_path = self.root / "etcd.log"

    def _prepare(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _command(self) -> list[str]:
        etcd = etcd_bin()
        if etcd is None:
            raise EngineError(f"etcd not found; install with: {ETCD_INSTALL}")
        peer = f"http://{HOST}:{self.peers[self.member]}"
        cluster = ",".join(f"{n}=http://{HOST}:{p}" for n, p in self.peers.items())
        return [str(etcd), "--name", self.member, "--data-dir", str(self.data),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", cluster, "--initial-cluster-state", "new",
                "--initial-cluster-token", "tally", "--heartbeat-interval", "100",
                "--election-timeout", "1000", "--logger", "zap", "--log-outputs", "stderr"]

    def _ready(self) -> bool:
        return _listening(self.port)  # quorum needs the other members: see healthy()

    def healthy(self) -> bool:
        return self.answers(self.url)

    @staticmethod
    def answers(url: str) -> bool:
        """The member is up and part of a quorum."""
        try:
            status, body = http_json(f"{url}/health", 1.0)
        except OSError:
            return False
        return status == 200 and isinstance(body, dict) and body.get("health") == "true"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


# -- Patroni ------------------------------------------------------------------------------------


def shard_secrets(root: Path) -> dict[str, str]:
    """The passwords one shard's nodes share (superuser, replication), kept across restarts."""
    path = root / "secrets.json"
    if path.exists():
        stored: dict[str, str] = json.loads(path.read_text())
        return stored
    made = {"superuser": secrets.token_hex(12), "replication": secrets.token_hex(12)}
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(made))
    path.chmod(0o600)
    return made


class PatroniNode(Engine):
    """One PostgreSQL server of shard ``scope``, run and failed over by Patroni."""

    def __init__(self, root: Path, scope: str, member: str, etcd_hosts: list[str],
                 passwords: dict[str, str], synchronous: bool = True,
                 pg_port: int | None = None, port: int | None = None) -> None:
        super().__init__(root, port)  # self.port: Patroni's REST API
        self.name = member
        self.scope = scope
        self.member = member
        self.etcd_hosts = etcd_hosts
        self.passwords = passwords
        self.synchronous = synchronous
        self.pg_port = pg_port or free_port()
        self.data = self.root / "pgdata"
        self.config = self.root / "patroni.yml"
        self.log_path = self.root / "patroni.log"
        self._pg = PostgresEngine(self.root)  # only for its OS user and its psql

    def _popen_kwargs(self) -> dict[str, Any]:
        return self._pg._popen_kwargs()

    def settings(self) -> dict[str, Any]:
        """Patroni's YAML (as JSON, which YAML reads): what production changes is in reliability.md."""
        postgres = require_binary("postgres", pg_bin("postgres"))
        addr = f"{HOST}:{self.pg_port}"
        return {
            "scope": self.scope, "name": self.member, "namespace": "/tally/",
            "log": {"level": "INFO"},
            "restapi": {"listen": f"{HOST}:{self.port}", "connect_address": f"{HOST}:{self.port}"},
            "etcd3": {"hosts": self.etcd_hosts},
            "bootstrap": {
                "dcs": {
                    # ttl: Patroni's minimum; a dead leader's key expires this long after its
                    # last renewal, and only then may a standby promote.
                    "ttl": 20, "loop_wait": 1, "retry_timeout": 5,
                    # A crashed primary under a live Patroni fails over at once instead of
                    # being restarted in place: safe with a synchronous standby.
                    "primary_start_timeout": 0,
                    "maximum_lag_on_failover": 1_048_576,
                    "synchronous_mode": self.synchronous, "synchronous_mode_strict": False,
                    "postgresql": {"use_pg_rewind": True, "use_slots": True, "parameters": {
                        "wal_level": "replica", "hot_standby": "on", "wal_log_hints": "on",
                        "max_wal_senders": 10, "max_replication_slots": 10,
                        "max_connections": 200, "wal_keep_size": "128MB"}}},
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, {"auth": "scram-sha-256"}]},
            "postgresql": {
                "listen": addr, "connect_address": addr, "data_dir": str(self.data),
                "bin_dir": str(postgres.resolve().parent), "pgpass": str(self.root / "pgpass"),
                "authentication": {
                    "superuser": {"username": "tally", "password": self.passwords["superuser"]},
                    "replication": {"username": "replicator",
                                    "password": self.passwords["replication"]}},
                "parameters": {"fsync": "on", "synchronous_commit": "on",
                               "full_page_writes": "on", "shared_buffers": "32MB",
                               "unix_socket_directories": ""},
                "pg_hba": [f"host replication replicator {HOST}/32 scram-sha-256",
                           f"host all all {HOST}/32 scram-sha-256"],
                "basebackup": [{"checkpoint": "fast"}]},
            "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False,
                     "nosync": False}}

    def _prepare(self) -> None:
        self.config.write_text(json.dumps(self.settings(), indent=1))
        user = self._pg._os_user
        if user is not None:
            for path in (self.root, self.config):
                os.chown(path, user.pw_uid, user.pw_gid)
            with contextlib.suppress(FileNotFoundError):
                os.chown(self.log_path, user.pw_uid, user.pw_gid)

    def _command(self) -> list[str]:
        patroni = patroni_bin()
        if patroni is None:
            raise EngineError(f"patroni not found; install with: {PATRONI_INSTALL}")
        return [str(patroni), str(self.config)]

    def _ready(self) -> bool:
        """PostgreSQL runs (as primary or standby) under this Patroni."""
        status, body = self.health()
        return status == 200 and isinstance(body, dict) and body.get("state") == "running"

    def health(self) -> tuple[int, Any]:
        try:
            return http_json(f"http://{HOST}:{self.port}/patroni", 1.0)
        except OSError:
            return 0, None

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def kill(self) -> None:
        """SIGKILL Patroni and its PostgreSQL (their own process groups): a machine crash."""
        pm = self.postmaster_pid()
        super().kill()
        if pm is not None:
            kill_group(pm)

    def stop(self, timeout_s: float = 30.0) -> None:
        pm = self.postmaster_pid()
        super().stop(timeout_s)  # Patroni stops its PostgreSQL on SIGTERM
        if pm is not None:
            kill_group(pm)

    def wipe(self) -> None:
        """Delete the data directory (a lost disk): Patroni re-clones it from the leader."""
        if self.running():
            raise EngineError(f"{self.member} is running; kill or stop it before wiping its disk")
        remove_tree(self.data)

    def dsn(self, database: str = "postgres") -> str:
        return (f"postgresql://tally:{self.passwords['superuser']}@{HOST}:{self.pg_port}/"
                f"{database}")

    def psql(self, sql: str, database: str = "postgres") -> str:
        self._pg.port, self._pg.password = self.pg_port, self.passwords["superuser"]
        return self._pg.psql(sql, database)

    @property
    def url(self) -> str:
        return self.dsn()


def multi_host_dsn(nodes: list[PatroniNode], database: str) -> str:
    """One DSN naming every node of a shard: the driver connects to whichever is the primary."""
    hosts = ",".join(f"{HOST}:{n.pg_port}" for n in nodes)
    return (f"postgresql://tally:{nodes[0].passwords['superuser']}@{hosts}/{database}"
            "?target_session_attrs=read-write")


def kill_group(pid: int) -> None:
    """SIGKILL the process group of ``pid`` (a postmaster's is not its own pid) and wait."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(os.getpgid(pid), signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def patroni_members(api_urls: list[str]) -> list[dict[str, Any]]:
    """The shard's members as Patroni reports them (name, role, state, lag in bytes), from the
    first node that answers; [] when none does."""
    for url in api_urls:
        try:
            status, body = http_json(f"{url}/cluster", 1.0)
        except OSError:
            continue
        if status == 200 and isinstance(body, dict):
            members: list[dict[str, Any]] = body.get("members", [])
            return members
    return []


# -- NATS cluster -------------------------------------------------------------------------------


class NatsClusterNode(NatsEngine):
    """One server of a JetStream cluster; ``routes`` are every member's cluster ports."""

    def __init__(self, root: Path, member: str, cluster_port: int, routes: list[int],
                 port: int | None = None) -> None:
        super().__init__(root, port)
        self.name = member
        self.member = member
        self.cluster_port = cluster_port
        self.routes = routes

    def _prepare(self) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        routes = ", ".join(f'"nats://{HOST}:{p}"' for p in self.routes)
        self.config.write_text(
            f"server_name: {self.member}\n"
            f"listen: {HOST}:{self.port}\n"
            f"http: {HOST}:{self.monitor_port}\n"
            f"jetstream {{\n  store_dir: {str(self.store)!r}\n"
            f"  sync_interval: {self.sync_interval}\n}}\n"
            f"cluster {{\n  name: tally\n  listen: {HOST}:{self.cluster_port}\n"
            f"  routes: [{routes}]\n}}\n")

    def _ready(self) -> bool:
        return _listening(self.port)  # JetStream needs a meta leader first: see healthy()

    def healthy(self) -> bool:
        return super()._ready()


def wait_until(what: str, check: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise EngineError(f"{what} not within {timeout_s:.0f} s")


def tcp_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((HOST, port)) == 0
