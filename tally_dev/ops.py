"""``tally cluster kill | restart | wipe NAME``: faults and repairs on one process of a dev cluster.

They work from the cluster's state file, so a command run from another shell than ``up`` acts on
the same processes: the state keeps, for every process, its pid and how to start it again (its
command line, user and environment) with the data it left.

Names are the status names. A Patroni node ``pgN-x`` is its agent and the PostgreSQL server it
runs: ``kill pgN-x`` SIGKILLs both (a machine crash); ``kill pgN-x.postgres`` only the server
(Patroni, still alive, fails over at once: ``primary_start_timeout`` is 0).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import httpx

from tally_dev.engines import Engine, EngineError, _listening
from tally_dev.ha import http_json, kill_group, remove_tree
from tally_dev.ha_cluster import postmaster_pid


class DevCluster(Protocol):
    """What these verbs need of ``tally_dev.cluster.DevCluster``: the processes this object
    started (used directly) and the state file (for those another command started)."""

    state_file: Path

    @property
    def engines(self) -> Mapping[str, Engine]: ...

    @property
    def processes(self) -> Mapping[str, Engine]: ...

    def _state(self) -> dict[str, dict[str, Any]]: ...

    def _save(self) -> None: ...

POSTGRES_SUFFIX = ".postgres"


def respawn_spec(engine: Engine) -> dict[str, Any]:
    kwargs = engine._popen_kwargs()
    return {"argv": engine._command(),
            "popen": {k: kwargs[k] for k in ("user", "group", "extra_groups", "env") if k in kwargs}}


def read_state(path: Path) -> dict[str, dict[str, Any]]:
    """A cluster's state file (name -> entry), empty when nothing was started from it."""
    try:
        state: dict[str, dict[str, Any]] = json.loads(path.read_text())
        return state
    except FileNotFoundError:
        return {}


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of this process is not alive
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _entry(dev: DevCluster, name: str) -> dict[str, Any]:
    state = dev._state()
    if name not in state:
        raise EngineError(f"no process named {name!r}; `tally cluster status` lists them")
    return state[name]


def kill(dev: DevCluster, name: str) -> None:
    """SIGKILL one process by its status name (for a Patroni node, see the module docstring)."""
    node = name.removesuffix(POSTGRES_SUFFIX)
    entry = _entry(dev, node)
    if name.endswith(POSTGRES_SUFFIX):
        pm = postmaster_pid(entry)
        if pm is None or not alive(pm):
            raise EngineError(f"{name} is not running")
        kill_group(pm)
        return
    engine = {**dev.engines, **dev.processes}.get(node)
    if engine is not None:
        engine.kill()
    else:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(entry["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while alive(entry["pid"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        pm = postmaster_pid(entry)
        if pm is not None:
            kill_group(pm)


def ready(entry: dict[str, Any]) -> bool:
    if entry.get("kind") == "patroni":
        try:
            status, body = http_json(f"{entry['api']}/patroni", 1.0)
        except OSError:
            return False
        return status == 200 and isinstance(body, dict) and body.get("state") == "running"
    if str(entry["url"]).startswith("http"):
        try:
            return httpx.get(f"{entry['url']}/readyz", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False
    return _listening(int(entry["port"]))


def restart(dev: DevCluster, name: str, timeout_s: float = 180.0) -> None:
    """Start a killed process again with its data (a wiped node re-clones from the primary)."""
    node = name.removesuffix(POSTGRES_SUFFIX)
    entry = _entry(dev, node)
    engine = {**dev.engines, **dev.processes}.get(node)
    if engine is not None:
        if not engine.running():
            engine.start(timeout_s)
            dev._save()
        return
    if not alive(entry["pid"]):
        if _listening(int(entry["port"])):
            raise EngineError(f"{node}: port {entry['port']} is taken")
        with open(entry["log"], "ab") as log:
            proc = subprocess.Popen(entry["argv"], stdout=log, stderr=log,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    **entry["popen"])
        state = dev._state()
        state[node]["pid"] = proc.pid
        dev.state_file.write_text(json.dumps(state, indent=2))
        entry = state[node]
    deadline = time.monotonic() + timeout_s
    while not ready(entry):
        if time.monotonic() > deadline:
            raise EngineError(f"{node} not ready within {timeout_s:.0f} s; see {entry['log']}")
        time.sleep(0.2)


def wipe(dev: DevCluster, name: str) -> None:
    """Delete a stopped PostgreSQL node's data directory: a lost disk."""
    node = name.removesuffix(POSTGRES_SUFFIX)
    entry = _entry(dev, node)
    if entry.get("kind") != "patroni":
        raise EngineError(f"{node} is not a PostgreSQL node (wipe takes pgN-a or pgN-b)")
    if alive(entry["pid"]) or alive(postmaster_pid(entry)):
        raise EngineError(f"{node} is running; `tally cluster kill {node}` first")
    remove_tree(Path(entry["pgdata"]))
