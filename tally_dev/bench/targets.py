"""The servers a benchmark drives: Tally, a peer, or the null server, each its own process.

Every server runs as a child process on a free loopback port with its data in a directory the
suite owns, and is stopped (then killed if it hangs) when the suite leaves its ``with`` block.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

from tally_dev.engines import HOST, free_port


class HttpServer:
    """A child process serving HTTP on ``port``; ready once ``ready_path`` answers 200."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None,
                 ready_path: str | None = "/healthz", port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.argv = [a.replace("{port}", str(self.port)) for a in argv]
        self.env = {**os.environ, **(env or {})}
        self.ready_path = ready_path
        self.log = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> HttpServer:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self._tail()}")
            if self._ready():
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{self.name} was not ready in {timeout_s:.0f} s: {self._tail()}")

    def _ready(self) -> bool:
        try:
            if self.ready_path is None:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return True
            return httpx.get(self.url + self.ready_path, timeout=1.0).status_code == 200
        except (OSError, httpx.TransportError):
            return False

    def _tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> HttpServer:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def tally_server(work: Path, name: str = "tally", **settings: str) -> HttpServer:
    """``tally serve`` on a fresh data directory; ``settings`` become ``TALLY_*`` variables."""
    env = {"TALLY_DATA_DIR": str(work / name / "data"), "TALLY_LOG_LEVEL": "WARNING",
           **{f"TALLY_{k.upper()}": v for k, v in settings.items()}}
    server = HttpServer(name, [sys.executable, "-m", "tally.cli", "serve", "--port", "{port}"],
                        work / name, env, ready_path="/readyz")
    return server


def peer_server(work: Path, name: str, kind: str, url: str, pool: int = 16) -> HttpServer:
    """A lean peer (granian RSGI) in front of the store ``kind`` at ``url``."""
    return HttpServer(name, [sys.executable, "-m", "tally_dev.bench.peers", kind, "--url", url,
                             "--port", "{port}", "--pool", str(pool)], work / name)


def null_server(work: Path) -> HttpServer:
    return HttpServer("null", [sys.executable, "-m", "tally_dev.bench.nullserver", "{port}"],
                      work / "null", ready_path=None)
