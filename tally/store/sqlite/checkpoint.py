"""Checkpoints of both SQLite files from a thread of their own.

By default SQLite checkpoints in the connection that commits: every ``wal_autocheckpoint`` pages
the likes writer would stop to copy the WAL into the database file and fsync it, and each request
in that group commit would wait for it; under bulk likes (random inserts: a WAL page per like) that
is often. Here a separate connection copies committed frames every ``INTERVAL_S`` with PASSIVE
checkpoints, which never block a writer or a reader; the writers keep an automatic checkpoint only
as a backstop (``BACKSTOP_PAGES``), for when this thread falls behind. Durability does not change:
a commit is durable once its WAL frames are synced, before any checkpoint (``synchronous=FULL`` on
every connection, this one included).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

log = logging.getLogger("tally.sqlite")

# Often enough that a WAL holds little to copy at a time; each round costs a few statements.
INTERVAL_S = 0.05

# The writers' own autocheckpoint (a hundred times SQLite's default of 1,000 pages). It is also
# what restarts the WAL: the passive checkpoints here keep up, but with commits back to back and a
# reader always in the WAL, a writer finds it wholly copied (the condition for writing it again
# from the start) only right after checkpointing itself, and each such commit waits on the disk.
# Rare backstops keep those commits rare; the price is a WAL file of up to ~400 MB under
# sustained writes, reused from its start after each restart.
BACKSTOP_PAGES = 100_000
SQLITE_IOERR = 10  # the primary result code of every I/O error (fsync's included)


class Checkpointer:
    def __init__(self, open_conn: Callable[[], sqlite3.Connection], files: Mapping[str, str],
                 interval_s: float = INTERVAL_S,
                 halted: Callable[[], bool] = lambda: False) -> None:
        """``files``: each file's name (for metrics) and its schema on the opened connection.
        ``halted``: true once a sync of a file failed elsewhere; no checkpoint runs after that."""
        self._open = open_conn
        self._halted = halted
        self.io_error: sqlite3.Error | None = None  # a failed checkpoint's I/O: see tick()
        self.files = dict(files)
        self.interval_s = interval_s
        self.checkpoints = 0
        self.failures = 0
        self.wal_frames: dict[str, int] = dict.fromkeys(self.files, 0)  # at the last checkpoint
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None

    def start(self) -> None:
        self._conn = self._open()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="tally-sqlite-checkpoint",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def run_once(self) -> None:
        """One PASSIVE checkpoint of each file: copies what no reader still needs, blocks no one."""
        if self._conn is None:
            raise RuntimeError("checkpointer is not started")
        for name, schema in self.files.items():
            _busy, frames, _copied = self._conn.execute(
                f"PRAGMA {schema}.wal_checkpoint(PASSIVE)").fetchone()
            self.wal_frames[name] = max(int(frames), 0)
        self.checkpoints += 1

    def tick(self) -> None:
        """One round, unless a sync failed: then no checkpoint runs until a restart. A failed
        fsync leaves pages the kernel could not write marked clean, so the next one "succeeds";
        a checkpoint would then copy WAL frames that never reached the disk into the database
        file and make them durable there, while the WAL on disk lacks them: after a power cut,
        the WAL's older frames would shadow newer pages of the database file."""
        if self.io_error is not None or self._halted():
            return
        try:
            self.run_once()
        except sqlite3.Error as exc:  # the writers' backstop still checkpoints meanwhile
            self.failures += 1
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF == SQLITE_IOERR:
                self.io_error = exc
                log.error("checkpoint I/O failed: checkpoints stop", extra={"error": str(exc)})
            else:  # busy, or a full disk: the next round may succeed
                log.warning("checkpoint failed", extra={"error": str(exc)})

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tick()


def settle_wal(path: Path, attempts: int = 50) -> bool:
    """At start, before anything is derived from a file: copy its whole WAL into the database
    file and start the WAL over, durably (a TRUNCATE checkpoint, then an fsync of the emptied
    WAL). Returns whether it did (False: the WAL stayed busy; a warning is logged).

    Why: after a failed fsync and a restart of the process (not of the machine), the WAL holds
    frames the kernel could not write but still serves from its cache, marked clean: they read as
    committed, yet a power cut takes them, and with them every later frame (the WAL's checksums
    chain), so counts derived from them, or commits appended behind them, would not survive it.
    A checkpoint writes their pages into the database file anew and syncs it; the WAL, emptied and
    synced, leaves no older frame on disk to shadow those pages after a cut. After a clean stop
    there is no WAL and nothing to do."""
    wal = Path(f"{path}-wal")
    if not wal.exists():
        return True
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=FULL")  # the checkpoint syncs the database file
        for _ in range(attempts):
            busy, _frames, _copied = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if not busy:
                break
            time.sleep(0.1)
        else:
            log.warning("could not settle the WAL at start: it stayed busy",
                        extra={"file": str(path)})
            return False
    finally:
        conn.close()
    if wal.exists():
        fd = os.open(wal, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)  # SQLite truncates the WAL without syncing that
        finally:
            os.close(fd)
    return True
