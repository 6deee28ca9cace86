"""Checkpoints of both SQLite files from a thread of their own.

By default SQLite checkpoints in the connection that commits: every ``wal_autocheckpoint`` pages
the likes writer stopped to copy the WAL into the database file and fsync it, and each request in
that group commit waited for it. Under bulk likes (random inserts: a WAL page per like) that was
a few milliseconds of every commit. Here a separate connection copies committed frames every
``interval_s`` with PASSIVE checkpoints, which never block a writer or a reader; the writers keep
an automatic checkpoint only as a backstop (a hundred times the usual size), for when this thread
falls behind. Durability does not change: a commit is durable once its WAL frames are synced, before
any checkpoint (``synchronous=FULL`` on every connection, this one included).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger("tally.sqlite")

# The writers' own autocheckpoint, in units of the usual one. It is also what restarts the WAL:
# the passive checkpoints here keep up, but with a commit every few ms and a reader always in the
# WAL, a writer found it wholly copied (the condition for writing it again from the start) only
# right after checkpointing itself. At 10 (10,000 pages, about 40 MB) that was three times a
# second under bulk likes, and each such commit took 20-37 ms, waiting on the disk (with the files
# on tmpfs they were gone): the likes writer's commit p99 22-23 ms, against 5.7 ms at 100 (bulk
# of 250 at 140 req/s, 20 s). The price is a WAL file of up to ~400 MB under sustained
# writes, reused from its start after each restart.
BACKSTOP_FACTOR = 100


class Checkpointer:
    def __init__(self, open_conn: Callable[[], sqlite3.Connection], files: Mapping[str, str],
                 interval_s: float) -> None:
        """``files``: each file's name (for metrics) and its schema on the opened connection."""
        self._open = open_conn
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

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except sqlite3.Error as exc:  # the writers' backstop still checkpoints meanwhile
                self.failures += 1
                log.warning("checkpoint failed", extra={"error": str(exc)})
