"""SQLite's single writer: one thread, one connection, group commit.

SQLite allows one writer at a time, so every write goes through this thread (the datasette
pattern). Jobs that arrive while a commit is in flight are gathered, up to a size bound, and
committed in one transaction: the write rate is then bounded by fsyncs per second times the batch
size, not by one fsync per like. A failing job fails alone and the rest of the batch still commits.

With ``durable`` given (``sqlite_synchronous=FULL``, see ``WalSync``), the connection commits
without syncing and a second thread makes each commit durable before its jobs are answered, while
the writer runs the next batch: the fsync leaves the writer's path, one sync covers every commit
made while the one before it ran, and no job is answered before its commit is on disk, as with
SQLite's own FULL.
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
class _Job:
    fn: JobFn
    weight: int
    future: asyncio.Future[Any]


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

# Groups committed at once, after a commit window that brought nothing, before the window is
# tried again (``GroupCommitWriter._window_open``).
WINDOW_RETRY = 16

# Most operations committed in one transaction: a commit answers all its requests at once, so its
# size is a floor under their latency; the bulk limit's default, so one bulk request fits.
MAX_OPS = 1000


def pipelines_sync(synchronous: str) -> bool:
    """Whether a likes writer syncs from a thread of its own (``GroupCommitWriter(durable=...)``):
    where each acknowledged commit must be on disk (FULL). EXTRA keeps SQLite's own syncs, which
    also sync the directory; NORMAL acknowledges before the disk by choice."""
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


class GroupCommitWriter:
    def __init__(self, connect: Callable[[], sqlite3.Connection], max_ops: int = MAX_OPS,
                 name: str = "tally-sqlite-writer", durable: Callable[[], None] | None = None,
                 before_commit: Callable[[], None] | None = None,
                 slow_commit_s: float = SLOW_COMMIT_S, window_s: float = 0.0,
                 more_may_come: Callable[[], bool] | None = None) -> None:
        """``durable``: makes the commits so far durable; the connection, once ``connect`` has
        opened it (and migrated it, synced by SQLite), then commits its own file without syncing,
        and each batch is answered after the first call that starts after its commit.
        ``before_commit``: runs before each ``COMMIT`` on the writer thread (the counts writer
        makes the like records it derived counts from durable first). ``window_s``: how long
        a group may wait for more jobs once the queue is empty, while ``more_may_come()`` says
        more may (the likes writer's commit window)."""
        self._connect = connect
        self.window_s = window_s
        self._more_may_come = more_may_come
        self._window_caught = True  # the last wait brought a job (writer thread only)
        self._window_skipped = 0
        self._durable = durable
        self._before_commit = before_commit
        self.slow_commit_s = slow_commit_s
        self.slow_commits = 0
        self._unsynced: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sync_thread: threading.Thread | None = None
        self.sync_error: OSError | None = None  # a failed sync: writes stop (see _sync_run)
        self.syncs = 0
        self.name = name
        self.max_ops = max_ops
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False  # set before the stop marker: nothing may queue behind it
        self.commits = 0
        self.committed_ops = 0
        self.failed_commits = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self.sync_error = None
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
        if self.sync_error is not None:
            raise Unavailable(f"the SQLite writer stopped after a failed sync: {self.sync_error}")
        fut = self._loop.create_future()
        self._queue.put(_Job(fn, weight, fut))
        return fut

    async def run(self, fn: JobFn, weight: int = 1) -> Any:
        return await self.submit(fn, weight)

    # -- writer thread ------------------------------------------------------------------------

    def _run(self, ready: queue.SimpleQueue[BaseException | None]) -> None:
        try:
            conn = self._connect()
            if self._durable is not None:
                conn.execute("PRAGMA main.synchronous=NORMAL")  # the sync thread syncs
        except BaseException as exc:  # reported to start(), which re-raises it
            ready.put(exc)
            return
        if self._durable is not None:
            self._sync_thread = threading.Thread(target=self._sync_run, name=f"{self.name}-sync",
                                                 daemon=True)
            self._sync_thread.start()
        ready.put(None)
        try:
            while True:
                batch = self._gather()
                if batch is None:
                    return
                self._commit(conn, batch)
        finally:
            if self._sync_thread is not None:  # answer every commit made before closing
                self._unsynced.put(_STOP)
                self._sync_thread.join()
                self._sync_thread = None
            conn.close()

    def _sync_run(self) -> None:
        """Syncs whatever has committed since the last sync, then answers those batches. A
        failed fsync cannot be retried safely (the kernel may have dropped the unwritten pages
        and marked them clean), so the batches fail and the writer takes no more writes: as
        PostgreSQL does, availability gives way to never acknowledging a lost write."""
        assert self._durable is not None
        stop = False
        while not stop:
            waiting = [self._unsynced.get()]
            while True:
                try:
                    waiting.append(self._unsynced.get_nowait())
                except queue.Empty:
                    break
            if _STOP in waiting:
                stop = True
                waiting = [w for w in waiting if w is not _STOP]
            if not waiting:
                continue
            if self.sync_error is None:
                try:
                    self._durable()
                    self.syncs += 1
                except OSError as exc:
                    self.sync_error = exc
                    log.error("WAL sync failed: writes stop", extra={"error": str(exc)})
            for batch, results in waiting:
                if self.sync_error is None:
                    self._resolve(batch, results)
                else:
                    err = Unavailable(f"storage sync failed: {self.sync_error}")
                    self._resolve(batch, [(False, err)] * len(batch))

    def _gather(self) -> list[_Job] | None:
        first = self._queue.get()
        if first is _STOP:
            return None
        batch: list[_Job] = [first]
        weight = first.weight
        until = None
        while weight < self.max_ops:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                if until is None and not self._window_open():
                    break
                until = until or time.monotonic() + self.window_s
                try:
                    job = self._queue.get(timeout=max(until - time.monotonic(), 0))
                    self._window_caught = True
                except queue.Empty:
                    if len(batch) == 1:  # the whole window passed and brought nothing
                        self._window_caught = False
                    break
            if job is _STOP:
                self._queue.put(_STOP)  # finish this batch, then stop
                break
            batch.append(job)
            weight += job.weight
        return batch

    def _window_open(self) -> bool:
        """Whether a group waits for more: only while more may come, and only while waiting
        has been bringing jobs. Where senders hold their jobs until they are answered (a
        closed loop), a wait never brings one and only delays the answer; a window that brought
        nothing is tried again every ``WINDOW_RETRY`` groups, so a change of load reopens it."""
        if self.window_s <= 0 or self._more_may_come is None or not self._more_may_come():
            return False
        if not self._window_caught:
            self._window_skipped += 1
            if self._window_skipped < WINDOW_RETRY:
                return False
        self._window_skipped = 0
        return True

    def _commit(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        """Runs the batch without savepoints first: two statements fewer per job. Only when a job
        fails is the transaction rolled back (its in-memory effects undone) and the batch run
        again with a savepoint per job, so the failing job fails alone, as before. Jobs are
        re-runnable: they read the database and the writer's state, both back where they were."""
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
            self._resolve(batch, [(False, err)] * len(batch))
            return
        self.commits += 1
        self.committed_ops += sum(j.weight for j in batch)
        if self._durable is None:
            self._resolve(batch, results)
        else:
            self._unsynced.put((batch, results))

    def _run_all(self, conn: sqlite3.Connection, tx: Tx, batch: list[_Job],
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
    def _run_job(conn: sqlite3.Connection, tx: Tx, job: _Job) -> tuple[bool, Any]:
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

    def _resolve(self, batch: list[_Job], results: list[tuple[bool, Any]]) -> None:
        assert self._loop is not None

        def deliver() -> None:
            for job, (ok, value) in zip(batch, results, strict=True):
                if job.future.done():
                    continue
                if ok:
                    job.future.set_result(value)
                else:
                    job.future.set_exception(value)

        self._loop.call_soon_threadsafe(deliver)
