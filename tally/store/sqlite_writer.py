"""SQLite's single writer: one thread, one connection, group commit.

SQLite allows one writer at a time, so every write goes through this thread (the datasette
pattern). Jobs that arrive while a commit is in flight are gathered, up to a short window and a
size bound, and committed in one transaction: the write rate is then bounded by fsyncs per second
times the batch size, not by one fsync per like. Each job runs in its own savepoint, so a failing
job fails alone and the rest of the batch still commits.
"""

from __future__ import annotations

import asyncio
import logging
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
    """What a job sees of the open transaction: actions to run once it has committed, and actions
    that undo a job's in-memory effects if its savepoint or the whole transaction rolls back."""

    on_commit: list[Callable[[], None]] = field(default_factory=list)
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


class GroupCommitWriter:
    def __init__(self, connect: Callable[[], sqlite3.Connection], window_s: float,
                 max_ops: int, name: str = "tally-sqlite-writer", begin: str = "BEGIN IMMEDIATE"
                 ) -> None:
        self._connect = connect
        self.name = name
        # A connection with another file attached takes "BEGIN": IMMEDIATE would lock every
        # attached file for writing, and so the other file's writer; a deferred transaction locks
        # only the file it writes. Each file has one writer, so the upgrade never meets another.
        self._begin = begin
        self.window_s = window_s
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
        self._queue.put(_Job(fn, weight, fut))
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
                self._commit(conn, batch)
        finally:
            conn.close()

    def _gather(self) -> list[_Job] | None:
        first = self._queue.get()
        if first is _STOP:
            return None
        batch: list[_Job] = [first]
        weight = first.weight
        deadline = time.monotonic() + self.window_s
        while weight < self.max_ops:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if job is _STOP:
                self._queue.put(_STOP)  # finish this batch, then stop
                break
            batch.append(job)
            weight += job.weight
        return batch

    def _commit(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        """Runs the batch without savepoints first: two statements fewer per job. Only when a job
        fails is the transaction rolled back (its in-memory effects undone) and the batch run
        again with a savepoint per job, so the failing job fails alone, as before. Jobs are
        re-runnable: they read the database and the writer's state, both back where they were."""
        tx = Tx()
        try:
            conn.execute(self._begin)
            results = self._run_all(conn, tx, batch, isolated=False)
            if len(results) < len(batch) or not all(ok for ok, _value in results):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                tx.undo()
                tx = Tx()
                conn.execute(self._begin)
                results = self._run_all(conn, tx, batch, isolated=True)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
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
        for action in tx.on_commit:
            action()
        self._resolve(batch, results)

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
        mark, undo_mark = len(tx.on_commit), len(tx.on_rollback)
        conn.execute("SAVEPOINT job")
        try:
            value = job.fn(conn, tx)
        except Exception as exc:
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
            del tx.on_commit[mark:]
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
