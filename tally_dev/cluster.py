"""``tally cluster up | down | status``: a development cluster of real engines and Tally processes.

``up`` starts, on loopback ports, two PostgreSQL servers (the two physical shard databases), NATS
with JetStream, Redis, then two API processes, a relay and two aggregators (``tally serve
--role ...``), writes their shared config (``cluster.toml``) and a state file with every process
id, and returns; everything keeps running in its own process group. ``status`` shows each one's
health and the event log's lag; ``down`` stops them all (the data stays for the next ``up``).
The end-to-end tests start the same set with the same class.

Nothing is installed: a missing binary is reported with the command that installs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tally_dev import ops
from tally_dev.engines import (
    HOST,
    Engine,
    EngineError,
    NatsEngine,
    PostgresEngine,
    RedisEngine,
    http_ok,
    missing_binaries,
)
from tally_dev.ha import EtcdEngine, missing_ha_binaries
from tally_dev.ha_cluster import entry_extra, postmaster_pid, roles, start_ha_engines
from tally_dev.ops import respawn_spec

DEFAULT_ROOT = Path("/tmp/tally-cluster")  # PostgreSQL's unprivileged user must reach it


@dataclass(frozen=True)
class Layout:
    apis: int = 2
    api_workers: int = 1  # processes of each API, on its one port (``tally serve --workers``)
    relays: int = 1
    aggregators: int = 2
    partitions: int = 8
    databases: int = 2
    ha: bool = False  # etcd, Patroni primary + standby per database, a 3-node NATS cluster
    etcd_members: int = 3
    nats_nodes: int = 3
    synchronous: bool = True  # Patroni synchronous_mode (HA only)


class TallyProcess(Engine):
    """``tally serve --role ROLE`` as a child process in its own group, ready when /readyz is 200."""

    def __init__(self, root: Path, role: str, index: int, config: Path,
                 env: dict[str, str] | None = None) -> None:
        super().__init__(root)
        self.role = role
        self.name = f"{role}-{index}"
        self.config = config
        self.env = env or {}
        self.log_path = self.root / f"{self.name}.log"

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "tally.cli", "serve", "--config", str(self.config),
                "--role", self.role, "--port", str(self.port)]

    def _popen_kwargs(self) -> dict[str, Any]:
        return {"env": {**os.environ, **self.env}}

    def _ready(self) -> bool:
        return http_ok(f"{self.url}/readyz")

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string is a JSON string


class DevCluster:
    def __init__(self, root: Path = DEFAULT_ROOT, layout: Layout = Layout(),
                 settings: dict[str, Any] | None = None,
                 pg_settings: dict[str, str] | None = None,
                 process_env: dict[str, str] | None = None) -> None:
        """``pg_settings``: extra postgresql.conf lines of the shard databases (non-HA layout),
        e.g. the statement statistics a profile reads. ``process_env``: extra environment of the
        Tally processes (a profile runs another checkout's code with PYTHONPATH)."""
        self.root = root.resolve()
        self.pg_settings = pg_settings or {}
        self.process_env = process_env or {}
        self.layout = layout
        self.overrides = settings or {}
        self.config = self.root / "cluster.toml"
        self.state_file = self.root / "state.json"
        self.engines: dict[str, Engine] = {}
        self.processes: dict[str, TallyProcess] = {}

    # -- up -----------------------------------------------------------------------------------

    def up(self) -> None:
        missing = [str(m) for m in missing_binaries()]
        if self.layout.ha:
            missing += missing_ha_binaries()
        if missing:
            raise EngineError("missing engine binaries (nothing was installed):\n"
                              + "\n".join(f"  {m}" for m in missing))
        if self._live_pids():
            raise EngineError(f"a cluster is already running from {self.root}; "
                              "`tally cluster down` first")
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o711)  # PostgreSQL runs as an unprivileged user that must enter it
        try:
            lay = self.layout
            values = (start_ha_engines(self.root, lay.databases, lay.etcd_members, lay.nats_nodes,
                                       lay.synchronous, self._start)
                      if lay.ha else self._start_engines())
            self._start("redis", RedisEngine(self.root / "redis", appendfsync="everysec"))
            self._write_config(values)
            self._start_processes()
        except BaseException:
            self.down()
            raise

    def _start_engines(self) -> dict[str, Any]:
        dsns = []
        for db in range(self.layout.databases):
            pg = PostgresEngine(self.root / f"pg{db}", settings=self.pg_settings)
            self._start(f"postgres-{db}", pg)
            if pg.psql("SELECT 1 FROM pg_database WHERE datname = 'tally'").strip() != "1":
                pg.create_database("tally")
            dsns.append(pg.dsn("tally"))
        self._start("nats", NatsEngine(self.root / "nats"))
        return {"postgres_dsns": dsns, "nats_url": self.engines["nats"].url}

    def _start(self, name: str, engine: Engine, timeout_s: float = 60.0) -> None:
        # Redis holds only a cache of counts rebuilt from PostgreSQL: everysec is enough.
        self.engines[name] = engine
        engine.start(timeout_s)
        self._save()

    def _write_config(self, engines: dict[str, Any]) -> None:
        values: dict[str, Any] = {
            "backend": "cluster", "log_partitions": self.layout.partitions, **engines,
            "redis_url": self.engines["redis"].url,
            "data_dir": str(self.root / "data"), "log_level": "INFO", **self.overrides}
        lines = ["# written by `tally cluster up`", "[tally]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        self.config.write_text("\n".join(lines) + "\n")

    def _start_processes(self) -> None:
        """Aggregators and relays first (they create the stream), then the APIs."""
        for role, count in (("aggregator", self.layout.aggregators),
                            ("relay", self.layout.relays), ("api", self.layout.apis)):
            env = dict(self.process_env)
            if role == "api" and self.layout.api_workers > 1:
                env["TALLY_WORKERS"] = str(self.layout.api_workers)
            for i in range(count):
                proc = TallyProcess(self.root / "procs", role, i, self.config, env)
                proc.start(timeout_s=60)
                self.processes[proc.name] = proc
                self._save()

    def _save(self) -> None:
        # A process killed on purpose (proc None) keeps its entry, so it can be restarted.
        entries = {n: e for n, e in self._state().items()
                   if n in self.engines or n in self.processes}
        for name, e in {**self.engines, **self.processes}.items():
            if e.proc is not None:
                entries[name] = {"pid": e.proc.pid, "url": e.url, "log": str(e.log_path),
                                 "signal": int(e.stop_signal), "port": e.port,
                                 **respawn_spec(e), **entry_extra(e)}
        self.state_file.write_text(json.dumps(entries, indent=2))

    # -- down and status ----------------------------------------------------------------------

    def _state(self) -> dict[str, dict[str, Any]]:
        return ops.read_state(self.state_file)

    def _live_pids(self) -> list[int]:
        return [e["pid"] for e in self._state().values() if ops.alive(e["pid"])]

    def down(self, timeout_s: float = 20.0) -> list[str]:
        """Stop the Tally processes, then the engines (clean shutdown, SIGKILL if they hang)."""
        state = self._state()
        order = sorted(state, key=lambda n: (n.split("-")[0] not in ("api", "relay",
                                                                       "aggregator"), n))
        stopped = []
        started_here = {**self.engines, **self.processes}
        for name in order:
            engine = started_here.get(name)
            if engine is not None:  # started by this object: stop() also reaps the child
                if engine.running():
                    stopped.append(name)
                engine.stop(timeout_s)
            elif _stop_group(state[name]["pid"], state[name]["signal"], timeout_s):
                stopped.append(name)
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        self.engines.clear()
        self.processes.clear()
        return stopped

    def kill(self, name: str) -> None:
        """SIGKILL one process by its status name (a crash)."""
        ops.kill(self, name)

    def restart(self, name: str) -> None:
        """Start a killed process again with its data, and wait until it is ready."""
        ops.restart(self, name)

    def wipe(self, name: str) -> None:
        """Delete a stopped PostgreSQL node's data directory (a lost disk)."""
        ops.wipe(self, name)

    def status(self) -> list[dict[str, Any]]:
        state = self._state()
        ha_roles = roles(state) if self.layout.ha or any("kind" in e for e in state.values()) \
            else {}
        rows = []
        for name, entry in state.items():
            row: dict[str, Any] = {"name": name, "pid": entry["pid"], "url": _public(entry["url"]),
                                   "running": ops.alive(entry["pid"]), **ha_roles.get(name, {})}
            if entry.get("kind") == "patroni":
                rows.append(self._postgres_row(name, entry, row))
            if entry.get("kind") == "etcd":
                row["ready"] = row["running"] and EtcdEngine.answers(entry["url"])
            elif entry["url"].startswith("http") and row["running"]:
                try:
                    resp = httpx.get(f"{entry['url']}/readyz", timeout=2.0)
                    row["ready"] = resp.status_code == 200
                    row["detail"] = resp.json()
                except (httpx.TransportError, ValueError) as exc:
                    row["ready"], row["detail"] = False, {"error": repr(exc)}
            else:
                row["ready"] = row["running"]
            rows.append(row)
        return rows

    @staticmethod
    def _postgres_row(name: str, entry: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
        """The PostgreSQL server of a Patroni node, a row of its own (``kill`` takes its name)."""
        pm = postmaster_pid(entry)
        up = pm is not None and ops.alive(pm)
        node["url"] = entry["api"]
        node["role"] = "patroni"
        info: dict[str, Any] = {k: node.pop(k) for k in ("state", "lag_bytes", "timeline") if k in node}
        return {"name": f"{name}{ops.POSTGRES_SUFFIX}", "pid": pm, "url": _public(entry["url"]),
                "running": up, "ready": up and info.get("state") in ("running", "streaming"),
                "role": node.pop("pg_role", "?"), **info}

    def urls(self, role: str) -> list[str]:
        return [e["url"] for n, e in self._state().items() if n.startswith(f"{role}-")]

    def settled(self, timeout_s: float) -> bool:
        """Waits until the event log has no backlog (outbox rows unpublished, messages
        unapplied); False if it still has one after ``timeout_s``."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            lag = log_lag(self.status())
            if lag["outbox_rows"] <= 0 and lag["log_messages"] <= 0:
                return True
            time.sleep(0.1)
        return False


def log_lag(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The event log's lag from the processes' readiness: outbox rows waiting, messages unapplied."""
    lag = {"outbox_rows": 0.0, "outbox_seconds": 0.0, "log_messages": 0.0, "log_seconds": 0.0}
    for row in rows:
        detail = row.get("detail") or {}
        lag["outbox_rows"] += detail.get("outbox_backlog", 0)
        lag["outbox_seconds"] = max(lag["outbox_seconds"], detail.get("outbox_lag_seconds", 0.0))
        lag["log_messages"] += detail.get("log_pending_messages", 0)
        lag["log_seconds"] = max(lag["log_seconds"], detail.get("log_lag_seconds", 0.0))
    return lag


def _public(url: str) -> str:
    """A URL without its password, for display."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1@", url)


def _stop_group(pid: int, sig: int, timeout_s: float) -> bool:
    """Signal a process group, wait for its leader to go, SIGKILL the group if it hangs."""
    if not ops.alive(pid):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    deadline = time.monotonic() + timeout_s
    while ops.alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    while ops.alive(pid) and time.monotonic() < deadline + 10:
        time.sleep(0.05)
    return True
