"""The likes writer in a process of its own, so its commits do not share a GIL with HTTP.

In one process the likes writer, the event loop, the counts writer and the checkpointer take turns
at one interpreter lock, so under bulk likes the writer waits for the lock while a second core
idles. Here ``GroupCommitWriter`` and ``apply_ops`` run in a child process that owns the likes
file's write connection; the server sends each event-loop turn's operations over a socket pair and
gets the results back once they are committed (durability unchanged: the child commits with the
same ``synchronous`` setting before it answers).

Each answer is still exact: the child reads the count table with the watermark it holds and adds
its own events after that watermark (``LoggedSince``); it needs nothing from the counts writer.
The server keeps everything else: reads, the counts writer and its aggregation rounds, the
checkpoints. If the child dies, the writes in flight fail with 503 (like any write whose commit
fails, safe to retry) and the server starts a new child.

Messages are length-prefixed pickles between two processes of one program: (request id, kind,
payload) one way, (request id, ok, payload, counters) the other.

At most ``WRITES_IN_FLIGHT`` writes are on their way to the child at once; operations that come
while they are out are held and go as one message when an answer comes back. The child commits one
group at a time while the one before it syncs, so a third message would only wait in its queue,
and every message costs both processes a system call, a wake-up and a job of their own: holding
them turns one message per event-loop turn into about one per commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import pickle
import socket
import sqlite3
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tally import logs
from tally.core.errors import Unavailable
from tally.core.model import CountKey, IncrOp, Op, OpResult, ToggleOp
from tally.gctune import tune_gc
from tally.store.sqlite.checkpoint import BACKSTOP_PAGES
from tally.store.sqlite.ops import (
    apply_ops,
    count_keys_of,
    counts_at_watermark,
    purge_idempotency,
    source_of,
    trim_log,
    watermark,
)
from tally.store.sqlite.pending import LoggedSince
from tally.store.sqlite.schema import connect, likes_path, migrate
from tally.store.sqlite.writer import (
    MAX_OPS,
    GroupCommitWriter,
    Tx,
    WalSync,
    pipelines_sync,
)

log = logging.getLogger("tally.sqlite.writer")

_HEADER = struct.Struct("!I")
WRITE, TRIM, PURGE, STOP = range(4)
READY = -1  # the request id of the child's first message
RESTART_DELAY_S = 0.5
# Writes sent and not yet answered, per writer: one committing and one syncing (see the module's
# docstring). More are held in the sender and go together.
WRITES_IN_FLIGHT = 2
# The commit window is used only while at least this many operations are expected to arrive
# within it at the recent rate (``_Child.more_may_come``), and that rate is a moving average with
# this weight per write.
EXPECTED_IN_WINDOW = 2.0
ARRIVAL_WEIGHT = 0.2


@dataclass(frozen=True)
class WriterConfig:
    path: Path
    synchronous: str = "FULL"
    shard: int = 0  # of the like records: this writer's file is likes_path(path, shard)
    log_level: str = "INFO"
    # Where the other API processes of ``tally serve --workers N`` connect (a Unix socket in a
    # directory only this user can enter); None with one API process.
    listen: Path | None = None
    commit_window_s: float = 0.0  # see _Child.more_may_come

    @property
    def source(self) -> str:
        """Its change log's name in the watermarks."""
        return source_of(self.shard)


def writer_socket(directory: Path, shard: int) -> Path:
    """Where shard ``shard``'s likes writer listens for the other API processes."""
    return directory / f"likes{shard}.sock"


def _to_wire(op: Op) -> tuple[Any, ...]:
    if isinstance(op, ToggleOp):
        return (op.counter, op.item, op.user, op.on, op.region)
    return (op.counter, op.item, op.n, op.region, op.idempotency_key, op.user, op.dedupe_window_s)


def _from_wire(row: tuple[Any, ...]) -> Op:
    return ToggleOp(*row) if len(row) == 5 else IncrOp(*row)


def _delta(op: Op) -> int:
    if isinstance(op, ToggleOp):
        return 1 if op.on else -1
    return op.n


@dataclass(frozen=True, slots=True)
class Prefetched:
    """Count-table values read ahead of a batch: at ``position`` (the watermark they hold), for
    ``keys`` (absent keys are 0 and left out of ``stored``)."""

    position: int
    keys: list[CountKey]
    stored: dict[CountKey, int]


class _Held:
    """Writes on their way to the child as one message: their operations (on the wire) and who
    waits for which (first row, how many, the caller's future)."""

    __slots__ = ("rows", "waiters")

    def __init__(self) -> None:
        self.rows: list[tuple[Any, ...]] = []
        self.waiters: list[tuple[int, int, asyncio.Future[list[OpResult]]]] = []

    def add(self, ops: Sequence[Op], out: asyncio.Future[list[OpResult]]) -> None:
        self.waiters.append((len(self.rows), len(ops), out))
        self.rows.extend(_to_wire(op) for op in ops)

    def deliver(self, answer: asyncio.Future[Any]) -> None:
        if answer.cancelled():
            self.fail(Unavailable("the likes writer's answer was cancelled"))
        elif (exc := answer.exception()) is not None:
            self.fail(exc)
        else:
            results = [OpResult(*r) for r in answer.result()]
            for start, n, out in self.waiters:
                if not out.done():
                    out.set_result(results[start:start + n])

    def fail(self, exc: BaseException) -> None:
        for _start, _n, out in self.waiters:
            if not out.done():
                out.set_exception(exc)


def _frame(message: tuple[Any, ...]) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


async def _send(writer: asyncio.StreamWriter, message: tuple[Any, ...]) -> None:
    writer.write(_frame(message))
    await writer.drain()


async def _receive(reader: asyncio.StreamReader) -> tuple[Any, ...]:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    message: tuple[Any, ...] = pickle.loads(await reader.readexactly(size))
    return message


# -- the child ------------------------------------------------------------------------------------

class _Child:
    def __init__(self, config: WriterConfig) -> None:
        self.config = config
        self.wal_sync = (WalSync(likes_path(config.path, config.shard))
                         if pipelines_sync(config.synchronous) else None)
        self.writer = GroupCommitWriter(self._open, durable=self.wal_sync,
                                        window_s=config.commit_window_s,
                                        more_may_come=self.more_may_come)
        self.logged = LoggedSince()
        self.unanswered = 0  # writes received and not yet answered, over every connection
        self.connections = 0
        self.ops_per_s = 0.0  # operations arriving, a moving average (``arrived``)
        self._last_arrival: float | None = None
        # A reader each for the writer thread and the event loop (a connection is not shared
        # between threads), opened on first use.
        self._readers: dict[str, sqlite3.Connection] = {}

    def _open(self) -> sqlite3.Connection:
        c = self.config
        c.path.parent.mkdir(parents=True, exist_ok=True)
        conn = connect(c.path, c.synchronous, writes="likes", shard=c.shard)
        # The checkpointer thread (``checkpoint``) copies the WAL; this is its backstop.
        conn.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
        migrate(conn, c.shard)
        rows = conn.execute("SELECT seq, counter, item, delta FROM changelog WHERE seq > ? "
                            "ORDER BY seq", (watermark(conn, None, c.source),))
        self.logged = LoggedSince((seq, (counter, item), d) for seq, counter, item, d in rows)
        return conn

    def _reader(self, thread: str) -> sqlite3.Connection:
        conn = self._readers.get(thread)
        if conn is None:
            c = self.config
            conn = self._readers[thread] = connect(c.path, c.synchronous, readonly=True,
                                                   shard=c.shard)
        return conn

    def prefetch(self, ops: Sequence[Op]) -> Prefetched:
        """On the event loop, before the batch is queued: the count table's values for its keys
        and the watermark they hold. On the writer thread this read would lengthen every batch,
        and that thread is the bound under bulk likes; here it overlaps the commit before it."""
        keys = count_keys_of(ops)
        position, stored = counts_at_watermark(self._reader("loop"), keys, self.config.source)
        return Prefetched(position, keys, stored)

    def _exact_counts(self, keys: Sequence[CountKey],
                      early: Prefetched | None = None) -> dict[CountKey, int]:
        """Count table + this writer's events after the watermark the table was read at. A
        prefetched read serves if it is for these keys and its watermark is not older than one
        this writer has already dropped its events through (rounds moved on meanwhile: read
        again)."""
        if early is not None and early.keys == keys and early.position >= self.logged.position:
            # A copy: the job may run again (isolated, after another job's failure).
            position, stored = early.position, dict(early.stored)
        else:
            position, stored = counts_at_watermark(self._reader("writer"), keys,
                                                   self.config.source)
        for key, d in self.logged.since(keys, position).items():
            stored[key] = stored.get(key, 0) + d
        return stored

    def apply(self, conn: sqlite3.Connection, tx: Tx, ops: list[Op],
              early: Prefetched | None = None) -> list[OpResult]:
        results, _overlay = apply_ops(conn, ops, lambda keys: self._exact_counts(keys, early),
                                      time.time())
        events = [(r.seq, (op.counter, op.item), _delta(op))
                  for op, r in zip(ops, results, strict=True) if r.seq is not None]
        if events:
            self.logged.add(events)
            first = events[0][0] - 1
            tx.on_rollback.append(lambda: self.logged.drop_after(first))
        return results

    def more_may_come(self) -> bool:
        """Whether an API process could send another write now: each sends up to
        ``WRITES_IN_FLIGHT`` before it holds the rest for an answer. Under moderate load a
        commit's group is small (its likes came one message at a time), and each commit costs
        its pages, a sync and a wake-up of every thread on the way back whatever its size; so
        the writer waits up to its window for the next message, if likes arrive fast enough to
        bring ``EXPECTED_IN_WINDOW`` within it (``arrived``). Where every connection has its
        writes out, the next comes only after an answer: waiting would only delay that answer,
        so a saturated writer never waits. Read by the writer thread, set by the loop."""
        return (self.unanswered < WRITES_IN_FLIGHT * max(self.connections, 1)
                and self.ops_per_s * self.config.commit_window_s >= EXPECTED_IN_WINDOW)

    def arrived(self, ops: int, now: float) -> None:
        """Updates the arrival rate with a write of ``ops`` operations at ``now``. The window
        pays only where the next write is likely to come within it: at a few likes a second
        every group would wait its whole window for nothing, adding it to each like's latency."""
        last, self._last_arrival = self._last_arrival, now
        if last is not None:
            rate = ops / max(now - last, 1e-4)
            self.ops_per_s += ARRIVAL_WEIGHT * (rate - self.ops_per_s)

    def counters(self) -> tuple[int, int, int, int, int]:
        w = self.writer
        return (w.commits, w.committed_ops, w.failed_commits, w.syncs, int(w.sync_error is not None))

    async def serve(self, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            self.writer.start()
        except Exception as exc:  # a schema it cannot open, say: the server reports why
            await _send(writer, (READY, False, f"{type(exc).__name__}: {exc}", self.counters()))
            writer.close()
            return
        server = await self._listen()
        await _send(writer, (READY, True, os.getpid(), self.counters()))
        pending: set[asyncio.Task[None]] = set()
        self.connections += 1
        try:
            await self._requests(reader, writer, pending)
        finally:
            self.connections -= 1
            if server is not None:
                server.close()
            await self.writer.stop()  # commits what is queued, then closes the connection
            if self.wal_sync is not None:
                self.wal_sync.close()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            for conn in self._readers.values():
                conn.close()
            writer.close()

    async def _listen(self) -> asyncio.AbstractServer | None:
        """The socket the other API processes write through. A dead predecessor's file is
        removed first; the directory it lives in is private to the server's user."""
        path = self.config.listen
        if path is None:
            return None
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        server = await asyncio.start_unix_server(self._client, path=str(path))
        path.chmod(0o600)
        return server

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Another API process: the same requests and answers as the server's own socket. Its
        going away ends only its own connection (what it has in flight still commits)."""
        pending: set[asyncio.Task[None]] = set()
        self.connections += 1
        try:
            await _send(writer, (READY, True, os.getpid(), self.counters()))
            await self._requests(reader, writer, pending)
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        except ConnectionError:
            pass
        finally:
            self.connections -= 1
            writer.close()

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        pending: set[asyncio.Task[None]]) -> None:
        """Reads requests until the peer says stop or goes away, each answered when done."""
        while True:
            try:
                req_id, kind, payload = await _receive(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # the peer is gone: nothing can be acknowledged to it any more
            if kind == STOP:
                return
            task = asyncio.create_task(self._answer(writer, req_id, kind, payload))
            pending.add(task)
            task.add_done_callback(pending.discard)

    async def _answer(self, writer: asyncio.StreamWriter, req_id: int, kind: int,
                      payload: Any) -> None:
        try:
            if kind == WRITE:
                ops = [_from_wire(row) for row in payload]
                early = self.prefetch(ops)
                if self.writer.window_s > 0:  # the rate only the commit window reads
                    self.arrived(len(ops), time.monotonic())
                self.unanswered += 1
                try:
                    results = await self.writer.submit(
                        lambda c, tx: self.apply(c, tx, ops, early), weight=len(ops))
                finally:
                    self.unanswered -= 1
                value: Any = [(r.changed, r.count, r.state, r.seq) for r in results]
            elif kind == TRIM:
                value = await self.writer.run(lambda c, tx: trim_log(c, tx, payload))
            else:
                value = await self.writer.run(purge_idempotency)
            message: tuple[Any, ...] = (req_id, True, value, self.counters())
        except Exception as exc:
            message = (req_id, False, str(exc), self.counters())
        with contextlib.suppress(ConnectionError):
            await _send(writer, message)


def child_main(sock: socket.socket, config: WriterConfig) -> None:
    """The child process: serve the server's writes until it says stop or goes away."""
    logs.setup(config.log_level)  # the server's structured logs, on the same stderr
    tune_gc()  # as in the server: a writer batch allocates as many objects as requests do
    asyncio.run(_Child(config).serve(sock))


# -- the server's side ----------------------------------------------------------------------------

class WriterProcess:
    """The server's handle on the child: sends requests, matches answers, restarts a dead child."""

    def __init__(self, config: WriterConfig) -> None:
        self.config = config
        self.commits = self.committed_ops = self.failed_commits = 0  # the child's, as last told
        self.syncs = 0  # its pipelined WAL syncs
        self.sync_failed = False  # its last sync failed: it takes no writes (see GroupCommitWriter)
        self.restarts = 0
        self.pid: int | None = None
        self._process: Any = None
        self._writer: asyncio.StreamWriter | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0
        self._writes = 0  # writes sent and not answered
        self._held = _Held()  # writes waiting for one of those answers
        self._stopping = False
        self._restarting: asyncio.Task[None] | None = None
        self._base = (0, 0, 0, 0)  # counters of children before the current one

    @property
    def running(self) -> bool:
        """A child is up and answering (false between its death and its replacement)."""
        return self._writer is not None and not self._writer.is_closing()

    async def start(self) -> None:
        self._stopping = False
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = socket.socketpair()
        process = ctx.Process(target=child_main, args=(theirs, self.config), daemon=True,
                              name="tally-likes-writer")
        await asyncio.to_thread(process.start)
        theirs.close()
        reader, writer = await asyncio.open_connection(sock=ours)
        try:
            req_id, ok, pid, _counters = await asyncio.wait_for(_receive(reader), 60)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as exc:
            writer.close()
            await asyncio.to_thread(process.join, 5)
            raise RuntimeError(f"the likes writer process did not start (exit code "
                               f"{process.exitcode}); its error is above") from exc
        assert req_id == READY
        if not ok:
            writer.close()
            await asyncio.to_thread(process.join, 5)
            raise RuntimeError(f"the likes writer process did not start: {pid}")
        self._process, self._writer, self.pid = process, writer, pid
        self._receiver = asyncio.create_task(self._receive_loop(reader),
                                             name="tally-writer-answers")

    async def stop(self) -> None:
        self._stopping = True
        if self._restarting is not None:
            self._restarting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restarting
        if self._writer is not None and self._process is not None:
            with contextlib.suppress(ConnectionError):
                await _send(self._writer, (0, STOP, None))
            await asyncio.to_thread(self._process.join, 60)
            if self._process.is_alive():
                self._process.kill()
        if self._receiver is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._receiver
        if self._writer is not None:
            self._writer.close()
        self._writer = self._process = self._receiver = None

    def submit(self, kind: int, payload: Any) -> asyncio.Future[Any]:
        """Send a request; the future resolves with the child's answer once committed."""
        if self._writer is None or self._writer.is_closing():
            raise Unavailable("the likes writer process is not running")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._next_id += 1
        self._waiting[self._next_id] = fut
        self._writer.write(_frame((self._next_id, kind, payload)))
        return fut

    def write(self, ops: Sequence[Op]) -> asyncio.Future[list[OpResult]]:
        """The operations' results once committed. Sent at once while fewer than
        ``WRITES_IN_FLIGHT`` writes are out (or once the held ones fill a writer's group), else
        held and sent with the others held when an answer comes back."""
        if self._writer is None or self._writer.is_closing():
            raise Unavailable("the likes writer process is not running")
        out: asyncio.Future[list[OpResult]] = asyncio.get_running_loop().create_future()
        held = self._held
        held.add(ops, out)
        if self._writes < WRITES_IN_FLIGHT or len(held.rows) >= MAX_OPS:
            self._send_held()
        return out

    def _send_held(self) -> None:
        held, self._held = self._held, _Held()
        if not held.waiters:
            return
        try:
            answer = self.submit(WRITE, held.rows)
        except Unavailable as exc:
            held.fail(exc)
            return
        self._writes += 1
        answer.add_done_callback(held.deliver)
        answer.add_done_callback(self._answered_write)

    def _answered_write(self, _answer: asyncio.Future[Any]) -> None:
        self._writes -= 1
        if self._held.waiters and self._writes < WRITES_IN_FLIGHT:
            self._send_held()

    async def trim(self, through_seq: int) -> int:
        removed: int = await self.submit(TRIM, through_seq)
        return removed

    async def purge(self) -> int:
        removed: int = await self.submit(PURGE, None)
        return removed

    async def _receive_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                req_id, ok, value, counters = await _receive(reader)
                self.commits, self.committed_ops, self.failed_commits, self.syncs = (
                    b + c for b, c in zip(self._base, counters[:4], strict=True))
                self.sync_failed = bool(counters[4])
                fut = self._waiting.pop(req_id, None)
                if fut is None or fut.done():
                    continue
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(Unavailable(f"storage write failed: {value}"))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._lost()

    def _lost(self) -> None:
        """The child's answers ended: fail what waits, and start a new child unless stopping."""
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(Unavailable("the likes writer process exited; the write may "
                                              "or may not have committed: retry it"))
        if self._writer is not None:
            self._writer.close()
        if not self._stopping:
            log.error("likes writer process exited", extra={
                "pid": self.pid, "exitcode": getattr(self._process, "exitcode", None)})
            self._writer = None
            self._restarting = asyncio.create_task(self._restart(), name="tally-writer-restart")

    async def _restart(self) -> None:
        while not self._stopping:
            await asyncio.sleep(RESTART_DELAY_S)
            if self._process is not None:
                await asyncio.to_thread(self._process.join, 5)
            self._base = (self.commits, self.committed_ops, self.failed_commits, self.syncs)
            try:
                await self.start()
            except Exception:
                log.exception("likes writer process failed to start again")
                continue
            self.restarts += 1
            log.warning("likes writer process restarted", extra={"pid": self.pid})
            return


class WriterClient(WriterProcess):
    """Another API process's handle on a likes writer that the first API process runs: the same
    requests over the writer's Unix socket (``WriterConfig.listen``). If the writer dies, the
    writes in flight fail with 503, and this reconnects once the first process has started a
    new one."""

    async def start(self) -> None:
        self._stopping = False
        path = self.config.listen
        if path is None:
            raise RuntimeError("a likes writer client needs the writer's socket")
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            req_id, ok, pid, _counters = await asyncio.wait_for(_receive(reader), 60)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as exc:
            writer.close()
            raise RuntimeError(f"the likes writer at {path} did not answer") from exc
        if req_id != READY or not ok:
            writer.close()
            raise RuntimeError(f"the likes writer at {path} refused: {pid}")
        self._writer, self.pid = writer, pid
        self._receiver = asyncio.create_task(self._receive_loop(reader),
                                             name="tally-writer-answers")

    async def stop(self) -> None:
        self._stopping = True
        if self._restarting is not None:
            self._restarting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restarting
        if self._writer is not None:
            self._writer.close()
        if self._receiver is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._receiver
        self._writer = self._receiver = None
