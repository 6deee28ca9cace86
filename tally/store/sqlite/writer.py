"""SQLite's single writer: one connection, group commit.

SQLite allows one writer at a time, so every write to a file goes through one connection (the
datasette pattern). Jobs that arrive while a commit is in flight are gathered, up to a size bound,
and committed in one transaction: the write rate is then bounded by fsyncs per second times the
batch size, not by one fsync per like. A failing job fails alone and the rest of the batch still
commits.

``Committer`` commits a group on its caller's thread (the likes writer process, which has one
thread); ``GroupCommitWriter`` gives it a thread and a queue of its own for a server's event loop
(the counts writer).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tally.core.errors import Unavailable

log = logging.getLogger("tally.sqlite.writer")


@dataclass
class Tx:
    """What a job sees of the open transaction: actions that undo a job's in-memory effects if its
    savepoint or the whole transaction rolls back."""

    on_rollback: list[Callable[[], None]] = field(default_factory=list)

    def undo(self, mark: int = 0) -> None:
        """Run the rollback actions registered after ``mark``, newest first, and forget them."""
        for action in reversed(self.on_rollback[mark:]):
            action()
        del self.on_rollback[mark:]


JobFn = Callable[[sqlite3.Connection, Tx], Any]


@dataclass(slots=True)
class Job:
    fn: JobFn
    weight: int
    future: asyncio.Future[Any] | None = None  # None: run by its caller (``commit_group``)


_STOP = object()
# A connection with another file attached takes a deferred "BEGIN": IMMEDIATE would lock every
# attached file for writing, and so the other file's writer; a deferred transaction locks only the
# file it writes. Each file has one writer, so the upgrade never meets another.
_BEGIN = "BEGIN"

# A COMMIT that takes longer is logged with its length ("slow commit"): it holds every request of
# the next group, and what makes it slow is not in the request path's own figures (the writers'
# backstop checkpoint runs inside it, and a disk stall shows there too). Matched with the loop's
# "event loop stalled" and the load generator's per-second latency, it tells stalls of the writer
# from stalls elsewhere.
SLOW_COMMIT_S = 0.05

# Most operations committed in one transaction: a commit answers all its requests at once, so its
# size is a floor under their latency; the bulk limit's default, so one bulk request fits.
MAX_OPS = 1000


def syncs_wal_itself(synchronous: str) -> bool:
    """Whether a likes writer commits without SQLite's sync and syncs its WAL itself, once for
    every commit of a round (``WalSync``): where each acknowledged commit must be on disk (FULL).
    EXTRA keeps SQLite's own syncs, which also sync the directory; NORMAL acknowledges before the
    disk by choice."""
    return synchronous.upper() == "FULL"


class WalSync:
    """Makes every commit written to a database's WAL durable: ``fdatasync`` of its ``-wal`` file.

    Linux syncs a file's data whatever descriptor asks, so this needs no hook into SQLite: a commit
    has written its frames to the file when ``COMMIT`` returns, and the next sync after that makes
    them durable. SQLite's WAL is a prefix log (each frame's checksum chains to the one before), so
    recovery after a power loss keeps exactly the commits that reached the disk in order, and
    ``synchronous=NORMAL`` still syncs the WAL's header when it starts the file over."""

    def __init__(self, db_path: os.PathLike[str] | str) -> None:
        self.path = f"{os.fspath(db_path)}-wal"
        self._fd: int | None = None
        self.syncs = 0

    def __call__(self) -> None:
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            # No WAL: no connection has the database open, and the last one to close copied
            # the WAL into the database file and synced it. Nothing is waiting.
            self.close()
            return
        if self._fd is not None and os.fstat(self._fd).st_ino != current:
            self.close()  # the file was removed and made again: sync the new one
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        os.fdatasync(self._fd)
        self.syncs += 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Committer:
    """Commits groups of jobs on one connection, on its caller's thread, and counts them."""

    def __init__(self, name: str = "tally-sqlite-writer",
                 before_commit: Callable[[], None] | None = None,
                 slow_commit_s: float = SLOW_COMMIT_S) -> None:
        """``before_commit``: runs before each ``COMMIT`` (the counts writer makes the like
        records it derived counts from durable first)."""
        self.name = name
        self._before_commit = before_commit
        self.slow_commit_s = slow_commit_s
        self.slow_commits = 0
        self.commits = 0
        self.committed_ops = 0
        self.failed_commits = 0

    def commit_group(self, conn: sqlite3.Connection,
                     batch: list[Job]) -> tuple[bool, list[tuple[bool, Any]]]:
        """Runs the batch in one transaction and commits it: (committed, a result per job).

        Runs the batch without savepoints first: two statements fewer per job. Only when a job
        fails is the transaction rolled back (its in-memory effects undone) and the batch run
        again with a savepoint per job, so the failing job fails alone, as before. Jobs are
        re-runnable: they read the database and the writer's state, both back where they were.
        A failed commit fails every job. Called on the thread that owns ``conn``."""
        tx = Tx()
        try:
            conn.execute(_BEGIN)
            results = self._run_all(conn, tx, batch, isolated=False)
            if len(results) < len(batch) or not all(ok for ok, _value in results):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                tx.undo()
                tx = Tx()
                conn.execute(_BEGIN)
                results = self._run_all(conn, tx, batch, isolated=True)
            if self._before_commit is not None:
                self._before_commit()
            started = time.perf_counter()
            conn.execute("COMMIT")
            took = time.perf_counter() - started
            if took >= self.slow_commit_s:
                self.slow_commits += 1
                log.warning("slow commit", extra={"writer": self.name, "commit_ms":
                                                  round(took * 1000, 1), "jobs": len(batch)})
        except (sqlite3.Error, OSError) as exc:
            log.error("commit failed", extra={"error": str(exc), "jobs": len(batch)})
            self.failed_commits += 1
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            tx.undo()
            err = Unavailable(f"storage write failed: {exc}")
            return False, [(False, err)] * len(batch)
        self.commits += 1
        self.committed_ops += sum(j.weight for j in batch)
        return True, results

    def _run_all(self, conn: sqlite3.Connection, tx: Tx, batch: list[Job],
                 isolated: bool) -> list[tuple[bool, Any]]:
        results: list[tuple[bool, Any]] = []
        for job in batch:
            if isolated:
                results.append(self._run_job(conn, tx, job))
                continue
            try:
                results.append((True, job.fn(conn, tx)))
            except Exception as exc:
                results.append((False, exc))
                break  # the transaction is run again, isolated
        return results

    @staticmethod
    def _run_job(conn: sqlite3.Connection, tx: Tx, job: Job) -> tuple[bool, Any]:
        undo_mark = len(tx.on_rollback)
        conn.execute("SAVEPOINT job")
        try:
            value = job.fn(conn, tx)
        except Exception as exc:
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
            tx.undo(undo_mark)
            return False, exc
        conn.execute("RELEASE job")
        return True, value


class GroupCommitWriter(Committer):
    """A ``Committer`` on a thread of its own: jobs submitted from the event loop are gathered
    while a commit runs, and each job's future resolves once its group has committed."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], max_ops: int = MAX_OPS,
                 name: str = "tally-sqlite-writer",
                 before_commit: Callable[[], None] | None = None,
                 slow_commit_s: float = SLOW_COMMIT_S) -> None:
        super().__init__(name, before_commit, slow_commit_s)
        self.max_ops = max_ops
        self._connect = connect
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False  # set before the stop marker: nothing may queue behind it

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        ready: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=self.name,
                                        daemon=True)
        self._thread.start()
        err = ready.get()
        if err is not None:
            raise err

    async def stop(self) -> None:
        if self._thread is not None:
            self._stopping = True
            self._queue.put(_STOP)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def submit(self, fn: JobFn, weight: int = 1) -> asyncio.Future[Any]:
        """Queue a job; its future resolves after the transaction holding it has committed."""
        if self._thread is None or self._loop is None or self._stopping:
            raise Unavailable("the SQLite writer is not running")
        fut = self._loop.create_future()
        self._queue.put(Job(fn, weight, fut))
        return fut

    async def run(self, fn: JobFn, weight: int = 1) -> Any:
        return await self.submit(fn, weight)

    # -- writer thread ------------------------------------------------------------------------

    def _run(self, ready: queue.SimpleQueue[BaseException | None]) -> None:
        try:
            conn = self._connect()
        except BaseException as exc:  # reported to start(), which re-raises it
            ready.put(exc)
            return
        ready.put(None)
        try:
            while True:
                batch = self._gather()
                if batch is None:
                    return
                self._resolve(batch, self.commit_group(conn, batch)[1])
        finally:
            conn.close()

    def _gather(self) -> list[Job] | None:
        first = self._queue.get()
        if first is _STOP:
            return None
        batch: list[Job] = [first]
        weight = first.weight
        while weight < self.max_ops:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                self._queue.put(_STOP)  # finish this batch, then stop
                break
            batch.append(job)
            weight += job.weight
        return batch

    def _resolve(self, batch: list[Job], results: list[tuple[bool, Any]]) -> None:
        assert self._loop is not None

        def deliver() -> None:
            for job, (ok, value) in zip(batch, results, strict=True):
                if job.future is None or job.future.done():
                    continue
                if ok:
                    job.future.set_result(value)
                else:
                    job.future.set_exception(value)

        self._loop.call_soon_threadsafe(deliver)
