"""Throwaway engine servers started from their binaries: PostgreSQL, Redis, NATS with JetStream.

Tests and ``tally cluster up`` use these to run real engines on free loopback ports, each in a
directory of its own, without touching any server already running on the machine. Each engine
starts in its own process group, so ``kill()`` takes down the whole engine at once (PostgreSQL's
backends too), the way a machine crash would; ``stop()`` is the clean shutdown.

Durability is part of each engine's start-up line, never left to a default:
PostgreSQL runs with ``fsync=on`` and ``synchronous_commit=on``; Redis appends every write to its AOF
with ``appendfsync always`` (or ``everysec``, chosen by the caller); JetStream flushes its store
with ``sync_interval: always``, because its default acks a publish before the 2-minute flush.

Nothing here installs anything: ``missing_binaries()`` says what is absent and how to install it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tally_dev.engine_bins import (
    EngineError,
    Missing,
    missing_binaries,
    nats_bin,
    pg_bin,
    redis_bin,
    require_binary,
)

__all__ = ["HOST", "Engine", "EngineError", "Missing", "NatsEngine", "PostgresEngine", "RedisEngine",
           "free_port", "missing_binaries", "nats_bin", "pg_bin", "redis_bin"]

HOST = "127.0.0.1"


def free_port() -> int:
    """A loopback port nobody listens on right now (the engine binds it a moment later)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


_LINUX = sys.platform == "linux"


def _die_with_parent() -> None:
    """In the child, before exec (after any change of user): ask Linux for SIGKILL when the parent
    dies (prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((HOST, port)) == 0


# -- the common process handling ----------------------------------------------------------------



def http_ok(url: str) -> bool:
    """Whether a GET of ``url`` answers 200 within a second: the readiness probe of every engine
    and server that serves one over HTTP."""
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False

class Engine:
    """One engine server process in ``root``, on a loopback port fixed for the engine's life.

    The port stays the same across ``kill()`` and ``start()``, so URLs handed out stay valid.
    """

    name = "engine"
    stop_signal = signal.SIGTERM
    # Tests set this: the engine then gets SIGKILL when the process that started it dies, so a
    # test run killed by a timeout leaves no server behind. `tally cluster up` leaves it off:
    # its engines must outlive the command.
    die_with_parent = False

    def __init__(self, root: str | os.PathLike[str], port: int | None = None) -> None:
        self.root = Path(root).resolve()
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / f"{self.name}.log"
        self._log_offset = 0  # where this run's log starts (a restart appends to the same file)

    # Subclasses provide these three.
    def _command(self) -> list[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Create the data directory and config on first start (kept across restarts)."""

    def _ready(self) -> bool:
        raise NotImplementedError

    def _popen_kwargs(self) -> dict[str, Any]:
        return {}

    @property
    def url(self) -> str:
        raise NotImplementedError

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 60.0) -> None:
        """Start and wait until the engine answers; on failure, raise with its log's tail."""
        if self.running():
            return
        self.launch()
        self.wait_ready(timeout_s)

    def launch(self) -> None:
        """Start the process without waiting for it (``wait_ready`` waits). With
        ``die_with_parent``, call it from a thread that outlives the engine: the kernel's
        parent-death signal follows the thread that forked, not the process."""
        if self.running():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self._prepare()
        if _listening(self.port):
            raise EngineError(f"{self.name}: port {self.port} is already taken")
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            self.proc = subprocess.Popen(
                self._command(), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                start_new_session=True, **self._popen_kwargs(),
                preexec_fn=_die_with_parent if self.die_with_parent and _LINUX else None)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until the launched engine answers; on failure, kill it and raise with its log's tail
        (from any thread: several engines may be waited for at once)."""
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EngineError(f"{self.name} exited with {self.proc.returncode}:\n"
                                  f"{self.log_tail()}")
            if self._ready():
                return
            time.sleep(0.05)
        self.kill()
        raise EngineError(f"{self.name} was not ready within {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 20.0) -> None:
        """Clean shutdown (``stop_signal``), then SIGKILL to the whole group if it hangs."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap_group()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the engine and every process it started: a crash, for recovery tests."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._reap_group()
        self.proc = None

    def _reap_group(self) -> None:
        """Leftover children (e.g. PostgreSQL backends) would keep the port or shared memory."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _listening(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def log_since_start(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._log_offset)
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- PostgreSQL ---------------------------------------------------------------------------------


def _engine_user(preferred: str | None) -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root: as root, run it as ``postgres`` (Debian's package user)."""
    if os.geteuid() != 0:
        return None
    name = preferred or "postgres"
    try:
        return pwd.getpwnam(name)
    except KeyError as exc:
        raise EngineError(f"postgres: running as root needs an unprivileged user {name!r}; "
                          "install with: apt-get install postgresql (it creates the user)") from exc


def _check_reachable(path: Path, user: pwd.struct_passwd) -> None:
    """Every parent must be searchable by the engine user, or PostgreSQL cannot reach its data."""
    for parent in path.parents:
        st = parent.stat()
        if st.st_mode & 0o001 or st.st_uid == user.pw_uid:
            continue
        if st.st_mode & 0o010 and st.st_gid == user.pw_gid:
            continue
        raise EngineError(f"postgres runs as {user.pw_name}, which cannot enter {parent}; "
                          "put the engine directory under a path others may traverse (e.g. /tmp)")


class PostgresEngine(Engine):
    """A PostgreSQL cluster in ``root/pgdata``, password-protected, TCP on loopback only.

    Durable profile: ``fsync=on``, ``synchronous_commit=on``, ``full_page_writes=on``; small buffers
    because tests start many. The superuser is ``tally``, with a random password in the DSN.
    """

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown; SIGTERM ("smart") waits for clients to leave

    def __init__(self, root: str | os.PathLike[str], port: int | None = None,
                 os_user: str | None = None, settings: dict[str, str] | None = None) -> None:
        super().__init__(root, port)
        self.data = self.root / "pgdata"
        self.user = "tally"
        self._os_user = _engine_user(os_user)
        pw_file = self.root / "pg-password"
        if pw_file.exists():  # a restart of the same cluster keeps its password
            self.password = pw_file.read_text().strip()
        else:
            self.password = secrets.token_hex(12)
        self.settings = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on",
                         "shared_buffers": "32MB", "max_connections": "200",
                         "unix_socket_directories": "''", "listen_addresses": f"'{HOST}'",
                         **(settings or {})}

    def _popen_kwargs(self) -> dict[str, Any]:
        if self._os_user is None:
            return {}
        u = self._os_user
        return {"user": u.pw_uid, "group": u.pw_gid, "extra_groups": [],
                "env": {"PATH": os.environ.get("PATH", ""), "HOME": str(self.root), "LC_ALL": "C"}}

    def _prepare(self) -> None:
        if (self.data / "PG_VERSION").exists():
            return
        initdb = require_binary("postgres", pg_bin("initdb"))
        pw_file = self.root / "pg-password"
        pw_file.write_text(self.password + "\n")
        if self._os_user is not None:
            _check_reachable(self.data, self._os_user)
            self.data.mkdir(mode=0o700, exist_ok=True)
            for path in (self.root, self.data, pw_file):
                os.chown(path, self._os_user.pw_uid, self._os_user.pw_gid)
        with open(self.log_path, "ab") as log:
            done = subprocess.run([str(initdb), "-D", str(self.data), "-U", self.user,
                                   "--auth=scram-sha-256", f"--pwfile={pw_file}", "-E", "UTF8",
                                   "--locale=C", "--no-instructions"],
                                  stdout=log, stderr=log, timeout=120, **self._popen_kwargs())
        if done.returncode != 0:
            raise EngineError(f"initdb failed ({done.returncode}):\n{self.log_tail()}")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n# tally engines: durable profile, loopback only\n")
            conf.writelines(f"{k} = {v}\n" for k, v in self.settings.items())

    def _command(self) -> list[str]:
        postgres = require_binary("postgres", pg_bin("postgres"))
        return [str(postgres), "-D", str(self.data), "-p", str(self.port)]

    def _ready(self) -> bool:
        return "ready to accept connections" in self.log_since_start() and _listening(self.port)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}:{self.password}@{HOST}:{self.port}/{database}"

    @property
    def url(self) -> str:
        return self.dsn()

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL with psql (no driver needed here); returns its unaligned output."""
        psql = require_binary("postgres", pg_bin("psql"))
        env = {**os.environ, "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "10"}
        done = subprocess.run([str(psql), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                               "-h", HOST, "-p", str(self.port), "-U", self.user, "-d", database,
                               "-c", sql], capture_output=True, text=True, env=env, timeout=60)
        if done.returncode != 0:
            raise EngineError(f"psql failed: {done.stderr.strip()}")
        return done.stdout

    def create_database(self, name: str) -> str:
        """A new empty database; returns its DSN."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise EngineError(f"database name {name!r} must match [a-z_][a-z0-9_]*")
        self.psql(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# -- Redis --------------------------------------------------------------------------------------


class RedisEngine(Engine):
    """``redis-server`` with an append-only file in ``root/redis`` and no RDB snapshots.

    ``appendfsync='always'`` fsyncs every write before replying (the durable profile);
    ``'everysec'`` may lose the last second on a machine crash, not on a process crash.
    """

    name = "redis"

    def __init__(self, root: str | os.PathLike[str], port: int | None = None,
                 appendfsync: str = "always") -> None:
        if appendfsync not in ("always", "everysec"):
            raise EngineError("appendfsync must be 'always' or 'everysec'")
        super().__init__(root, port)
        self.appendfsync = appendfsync
        self.data = self.root / "redis"

    def _prepare(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)

    def _command(self) -> list[str]:
        redis = require_binary("redis", redis_bin())
        return [str(redis), "--port", str(self.port), "--bind", HOST, "--dir", str(self.data),
                "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "",
                "--daemonize", "no", "--protected-mode", "yes"]

    def command(self, *words: str, timeout_s: float = 5.0) -> bytes:
        """Send one inline command and return the first reply line (no driver needed here)."""
        with socket.create_connection((HOST, self.port), timeout=timeout_s) as s:
            s.sendall(" ".join(words).encode() + b"\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
            return reply.strip()

    def _ready(self) -> bool:
        try:
            return self.command("PING", timeout_s=0.5) == b"+PONG"
        except OSError:
            return False

    def flushall(self) -> None:
        if (reply := self.command("FLUSHALL")) != b"+OK":
            raise EngineError(f"redis FLUSHALL failed: {reply!r}")

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"


# -- NATS with JetStream ------------------------------------------------------------------------


class NatsEngine(Engine):
    """``nats-server`` with JetStream in ``root/jetstream``, fsyncing every write to its store."""

    name = "nats"

    def __init__(self, root: str | os.PathLike[str], port: int | None = None,
                 monitor_port: int | None = None, sync_interval: str = "always") -> None:
        super().__init__(root, port)
        self.monitor_port = monitor_port or free_port()
        self.sync_interval = sync_interval
        self.store = self.root / "jetstream"
        self.config = self.root / "nats.conf"

    def _prepare(self) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            f"listen: {HOST}:{self.port}\n"
            f"http: {HOST}:{self.monitor_port}\n"
            f"jetstream {{\n  store_dir: {str(self.store)!r}\n"
            f"  sync_interval: {self.sync_interval}\n}}\n")

    def _command(self) -> list[str]:
        nats = require_binary("nats", nats_bin())
        return [str(nats), "-c", str(self.config)]

    def _ready(self) -> bool:
        return http_ok(f"http://{HOST}:{self.monitor_port}/healthz")

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"


def main(argv: list[str] | None = None) -> int:
    """``python -m tally_dev.engines``: report the missing binaries (exit 1 when some are missing)."""
    missing = missing_binaries()
    for m in missing:
        print(m, file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
