"""A filesystem that forgets what was not synced: storage faults for the durability tests.

A FUSE pass-through of a backing directory (``fs.py``) that keeps, per file, what has not been
fsynced (``journal.py``) and, on command, loses it as a power cut would, fails an fsync with EIO, or
runs out of space. ``FaultFS`` runs it as a process of its own (so killing the service under test
leaves it up) and drives it through its control socket.

Needs /dev/fuse, ``fusermount3`` and libfuse3 (Debian's fuse3; ``scripts/ensure-engines.sh``
installs them) and the ``mfusepy`` package.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any


def available() -> str | None:
    """Why the filesystem cannot run here, or None when it can."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "no fusermount3 (Debian package fuse3)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: libfuse itself is missing
        return f"mfusepy cannot load libfuse: {exc}"
    return None


class FaultFS:
    """``backing`` mounted at ``mountpoint`` with faults on command; ``cut`` is a power cut and
    a reboot: unsynced writes undone, unmounted, mounted again."""

    def __init__(self, backing: Path, mountpoint: Path, log: Path | None = None) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.control = str(backing.parent / f".{backing.name}.faultfs.sock")
        self.log = log or backing.parent / f"{backing.name}.faultfs.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.undone_bytes = 0  # over every cut
        self.cuts = 0

    def mount(self, timeout_s: float = 20.0) -> FaultFS:
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tally_dev.faultfs", str(self.backing),
                 str(self.mountpoint), self.control],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while not (self.mounted() and os.path.exists(self.control)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.unmount()
                raise RuntimeError(f"faultfs did not mount: {self.log.read_text()[-2000:]}")
            time.sleep(0.02)
        return self

    def mounted(self) -> bool:
        """Listed in the mount table (a frozen or dead filesystem still is, until unmounted)."""
        target = os.path.realpath(self.mountpoint)
        with open("/proc/self/mounts") as mounts:
            return any(line.split()[1] == target for line in mounts)

    def unmount(self, grace_s: float = 20.0) -> None:
        """Detach the mount (lazily) and wait ``grace_s`` for the daemon to exit, then kill it.

        After a lazy unmount the daemon may still be answering the kernel's last calls for every
        inode it ever handed out (thousands for a PostgreSQL data directory, slow in Python);
        once the data is settled (after a cut, or when the test is done with it) nothing needs
        those answers, so callers that know it pass a short grace."""
        if self.mounted():
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False,
                           capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None

    def command(self, **request: Any) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(60)
            s.connect(self.control)
            s.sendall(json.dumps(request).encode() + b"\n")
            answer: dict[str, Any] = json.loads(s.makefile("rb").readline())
        if not answer.get("ok"):
            raise RuntimeError(f"faultfs refused {request}: {answer}")
        return answer

    def cut(self) -> int:
        """Power cut and reboot: call with every process using the filesystem already killed.
        Returns the unsynced bytes lost."""
        undone = int(self.command(cmd="cut")["undone_bytes"])
        self.unmount(grace_s=2.0)  # frozen: the backing directory already holds what survives
        self.mount()
        self.undone_bytes += undone
        self.cuts += 1
        return undone

    def fail_next_sync(self, pattern: str) -> None:
        """The next fsync of a file whose base name matches the glob ``pattern`` fails with EIO."""
        self.command(cmd="eio", pattern=pattern)

    def set_full(self, on: bool) -> None:
        self.command(cmd="full", on=on)

    def set_lying(self, on: bool) -> None:
        """fsync answers success and syncs nothing (the negative control of the tests)."""
        self.command(cmd="lie", on=on)

    def stats(self) -> dict[str, Any]:
        return self.command(cmd="stats")

    def __enter__(self) -> FaultFS:
        return self.mount()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.unmount()
