"""The likes writer in a process of its own, so its commits do not share a GIL with HTTP.

In one process the likes writer, the event loop, the counts writer and the checkpointer take turns
at one interpreter lock, so under bulk likes the writer waits for the lock while a second core
idles. Here ``apply_ops`` runs in a child process that owns the likes file's write connection; the
server sends each event-loop turn's operations over a socket pair and gets the results back once
they are committed and durable (with ``synchronous=FULL`` the child syncs the WAL itself, once a
round, before it answers; see ``_Child``).

Each answer is still exact: the child reads the count table with the watermark it holds and adds
its own events after that watermark (``LoggedSince``); it needs nothing from the counts writer.
The server keeps everything else: reads, the counts writer and its aggregation rounds, the
checkpoints. If the child dies, the writes in flight fail with 503 (like any write whose commit
fails, safe to retry) and the server starts a new child.

Messages are length-prefixed pickles between two processes of one program: (request id, kind,
payload) one way, (request id, ok, payload, counters) the other.

At most ``WRITES_IN_FLIGHT`` writes are on their way to the child at once; operations that come
while they are out are held and go as one message when an answer comes back. While the child
commits and syncs one round, the next message waits in its socket for the next round; a third
would only wait there too, and every message costs both processes a system call, a wake-up and a
job of their own: holding them turns one message per event-loop turn into about one per round.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import multiprocessing
import os
import pickle
import selectors
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
    Committer,
    Job,
    Tx,
    WalSync,
    syncs_wal_itself,
)

log = logging.getLogger("tally.sqlite.writer")

_HEADER = struct.Struct("!I")
WRITE, TRIM, PURGE, STOP = range(4)
READY = -1  # the request id of the child's first message
RESTART_DELAY_S = 0.5
# An API process that does not take its answers for this long is dropped (its writes fail there
# with 503), so that it cannot hold the writer and every other process's writes.
SEND_TIMEOUT_S = 10.0
RECEIVE_BYTES = 1 << 20
# Writes sent and not yet answered, per writer: one in the child's round and one waiting for the
# next (see the module's docstring). More are held in the sender and go together.
WRITES_IN_FLIGHT = 2


@dataclass(frozen=True)
class WriterConfig:
    path: Path
    synchronous: str = "FULL"
    shard: int = 0  # of the like records: this writer's file is likes_path(path, shard)
    log_level: str = "INFO"
    # Where the other API processes of ``tally serve --workers N`` connect (a Unix socket in a
    # directory only this user can enter); None with one API process.
    listen: Path | None = None

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
    """Count-table values read ahead of a round: at ``position`` (the watermark they hold), for
    ``keys`` (absent keys are 0 and left out of ``stored``)."""

    position: int
    keys: set[CountKey]
    stored: dict[CountKey, int]

    def covers(self, keys: Sequence[CountKey]) -> bool:
        return self.keys.issuperset(keys)


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

class _Peer:
    """An API process's connection to the child, and what it sent that is not a whole message
    yet."""

    __slots__ = ("buffer", "primary", "sock")

    def __init__(self, sock: socket.socket, primary: bool) -> None:
        sock.settimeout(SEND_TIMEOUT_S)  # reads come only when the selector says ready
        self.sock = sock
        self.buffer = bytearray()
        self.primary = primary  # the server's own socket: its end is the child's

    def messages(self) -> list[tuple[Any, ...]] | None:
        """The whole messages that have arrived; None once the peer has gone away."""
        try:
            data = self.sock.recv(RECEIVE_BYTES)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return []
        except OSError:
            return None
        if not data:
            return None
        buf = self.buffer
        buf += data
        out: list[tuple[Any, ...]] = []
        start = 0
        while len(buf) - start >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buf, start)
            end = start + _HEADER.size + size
            if end > len(buf):
                break
            out.append(pickle.loads(buf[start + _HEADER.size:end]))
            start = end
        del buf[:start]
        return out


class _Child:
    """The writer's one thread: each round reads every message that has arrived, commits them,
    syncs once and answers them all.

    The likes that come while a round commits and syncs wait in the sockets and go together in
    the next round, so under load a round grows instead of queueing. A message's arrival, its
    job and its answer stay on one thread: when the child ran an event loop, a writer thread and
    a sync thread, every message woke all three in turn, and each wake-up (a futex, the
    interpreter lock changing hands) cost about what the like's SQL does (docs/performance.md)."""

    def __init__(self, config: WriterConfig) -> None:
        self.config = config
        self.wal_sync = (WalSync(likes_path(config.path, config.shard))
                         if syncs_wal_itself(config.synchronous) else None)
        self.committer = Committer(name="tally-likes-writer")
        self.sync_error: OSError | None = None  # a failed sync: no more writes (see _sync)
        self.logged = LoggedSince()
        # The count table is read through a connection of its own (a connection is one
        # transaction at a time), opened on first use.
        self._reader: sqlite3.Connection | None = None

    def _open(self) -> sqlite3.Connection:
        c = self.config
        c.path.parent.mkdir(parents=True, exist_ok=True)
        conn = connect(c.path, c.synchronous, writes="likes", shard=c.shard)
        # The checkpointer thread (``checkpoint``) copies the WAL; this is its backstop.
        conn.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
        migrate(conn, c.shard)
        if self.wal_sync is not None:
            conn.execute("PRAGMA main.synchronous=NORMAL")  # each round syncs (``_sync``)
        rows = conn.execute("SELECT seq, counter, item, delta FROM changelog WHERE seq > ? "
                            "ORDER BY seq", (watermark(conn, None, c.source),))
        self.logged = LoggedSince((seq, (counter, item), d) for seq, counter, item, d in rows)
        return conn

    def _counts_reader(self) -> sqlite3.Connection:
        if self._reader is None:
            c = self.config
            self._reader = connect(c.path, c.synchronous, readonly=True, shard=c.shard)
        return self._reader

    def prefetch(self, ops: Sequence[Op]) -> Prefetched:
        """The count table's values for a round's keys and the watermark they hold: one read
        for every job of the round, not one per job."""
        keys = count_keys_of(ops)
        position, stored = counts_at_watermark(self._counts_reader(), keys, self.config.source)
        return Prefetched(position, set(keys), stored)

    def _exact_counts(self, keys: Sequence[CountKey],
                      early: Prefetched | None = None) -> dict[CountKey, int]:
        """Count table + this writer's events after the watermark the table was read at. A
        prefetched read serves if it covers these keys and its watermark is not older than one
        this writer has already dropped its events through (rounds moved on meanwhile: read
        again)."""
        if early is not None and early.covers(keys) and early.position >= self.logged.position:
            # A copy: the job may run again (isolated, after another job's failure).
            position = early.position
            stored = {key: early.stored[key] for key in keys if key in early.stored}
        else:
            position, stored = counts_at_watermark(self._counts_reader(), keys,
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

    def counters(self) -> tuple[int, int, int, int, int]:
        c = self.committer
        syncs = self.wal_sync.syncs if self.wal_sync is not None else 0
        return (c.commits, c.committed_ops, c.failed_commits, syncs,
                int(self.sync_error is not None))

    def run(self, sock: socket.socket) -> None:
        """Serves until the server says stop or goes away; what has arrived by then still
        commits and is answered."""
        try:
            conn = self._open()
        except Exception as exc:  # a schema it cannot open, say: the server reports why
            with contextlib.suppress(OSError):
                sock.sendall(_frame((READY, False, f"{type(exc).__name__}: {exc}",
                                     self.counters())))
            return
        sel = selectors.DefaultSelector()
        listener = self._listen()
        if listener is not None:
            sel.register(listener, selectors.EVENT_READ, None)
        peers: dict[int, _Peer] = {}
        self._add(sel, peers, _Peer(sock, primary=True))
        try:
            sock.sendall(_frame((READY, True, os.getpid(), self.counters())))
            stopping = False
            while not stopping:
                requests, stopping = self._read(sel, peers)
                if requests:
                    self._round(conn, requests, sel, peers)
                # The server took no answers for SEND_TIMEOUT_S and was dropped: it will start
                # another writer, and this one must not stay behind it.
                stopping = stopping or sock.fileno() < 0
        finally:
            for peer in list(peers.values()):
                self._drop(sel, peers, peer)
            if listener is not None:
                listener.close()
            conn.close()
            if self.wal_sync is not None:
                self.wal_sync.close()
            if self._reader is not None:
                self._reader.close()

    def _read(self, sel: selectors.BaseSelector, peers: dict[int, _Peer]
              ) -> tuple[list[tuple[_Peer, tuple[Any, ...]]], bool]:
        """Waits for messages, then takes every one that has arrived: (the requests, whether the
        server has said stop or gone away)."""
        requests: list[tuple[_Peer, tuple[Any, ...]]] = []
        stopping = False
        for key, _events in sel.select():
            if key.data is None:
                self._accept(key.fileobj, sel, peers)  # type: ignore[arg-type]
                continue
            peer: _Peer = key.data
            messages = peer.messages()
            if messages is None:  # gone: nothing can be acknowledged to it any more
                stopping = stopping or peer.primary
                self._drop(sel, peers, peer)
                continue
            for message in messages:
                if message[1] == STOP:
                    stopping = stopping or peer.primary
                else:
                    requests.append((peer, message))
        return requests, stopping

    def _listen(self) -> socket.socket | None:
        """The socket the other API processes write through. A dead predecessor's file is
        removed first; the directory it lives in is private to the server's user."""
        path = self.config.listen
        if path is None:
            return None
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        path.chmod(0o600)
        listener.listen(64)
        listener.setblocking(False)
        return listener

    def _add(self, sel: selectors.BaseSelector, peers: dict[int, _Peer], peer: _Peer) -> None:
        sel.register(peer.sock, selectors.EVENT_READ, peer)
        peers[peer.sock.fileno()] = peer

    def _accept(self, listener: socket.socket, sel: selectors.BaseSelector,
                peers: dict[int, _Peer]) -> None:
        """Another API process: the same requests and answers as the server's own socket. Its
        going away ends only its own connection."""
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while True:
                client, _address = listener.accept()
                peer = _Peer(client, primary=False)
                try:
                    client.sendall(_frame((READY, True, os.getpid(), self.counters())))
                except OSError:
                    client.close()
                    continue
                self._add(sel, peers, peer)

    def _drop(self, sel: selectors.BaseSelector, peers: dict[int, _Peer], peer: _Peer) -> None:
        fd = peer.sock.fileno()
        if fd < 0 or peers.pop(fd, None) is None:
            return
        sel.unregister(peer.sock)
        peer.sock.close()

    def _round(self, conn: sqlite3.Connection, requests: list[tuple[_Peer, tuple[Any, ...]]],
               sel: selectors.BaseSelector, peers: dict[int, _Peer]) -> None:
        """Commits the requests of one round, makes them durable with one sync, then answers
        each."""
        if self.sync_error is not None:
            stopped = f"the likes writer stopped after a failed sync: {self.sync_error}"
            answers: list[tuple[bool, Any]] = [(False, stopped)] * len(requests)
        else:
            answers = self._commit_round(conn, [(kind, [_from_wire(row) for row in payload]
                                                 if kind == WRITE else payload)
                                                for _peer, (_req_id, kind, payload) in requests])
        self._answer(requests, answers, sel, peers)

    def _commit_round(self, conn: sqlite3.Connection,
                      work: list[tuple[int, Any]]) -> list[tuple[bool, Any]]:
        """A transaction per ``MAX_OPS`` operations, every write's counts read once for the
        round, then the sync: a result per request."""
        round_ops = [op for kind, ops in work if kind == WRITE for op in ops]
        early = self.prefetch(round_ops) if round_ops else None
        jobs = [self._job(kind, payload, early) for kind, payload in work]
        answers: list[tuple[bool, Any]] = []
        committed = False
        for group in _groups(jobs, MAX_OPS):
            ok, results = self.committer.commit_group(conn, group)
            committed = committed or ok
            answers.extend(results)
        if committed and not self._sync():
            answers = [(False, f"storage sync failed: {self.sync_error}")] * len(jobs)
        return answers

    def _job(self, kind: int, payload: Any, early: Prefetched | None) -> Job:
        if kind == WRITE:
            return Job(lambda conn, tx: self.apply(conn, tx, payload, early), len(payload))
        if kind == TRIM:
            return Job(functools.partial(trim_log, through_seq=payload), 1)
        return Job(purge_idempotency, 1)

    def _sync(self) -> bool:
        """Makes the round's commits durable. A failed fsync cannot be retried safely (the
        kernel may have dropped the unwritten pages and marked them clean), so the round fails
        and the writer takes no more writes: as PostgreSQL does, availability gives way to
        never acknowledging a lost write."""
        if self.wal_sync is None:
            return True
        try:
            self.wal_sync()
        except OSError as exc:
            self.sync_error = exc
            log.error("WAL sync failed: writes stop", extra={"error": str(exc)})
            return False
        return True

    def _answer(self, requests: list[tuple[_Peer, tuple[Any, ...]]],
                answers: list[tuple[bool, Any]], sel: selectors.BaseSelector,
                peers: dict[int, _Peer]) -> None:
        """Each peer's answers in one send. A peer that takes none for ``SEND_TIMEOUT_S`` is
        dropped: its writes fail there, and the others' go on."""
        counters = self.counters()
        frames: dict[int, list[bytes]] = {}
        for (peer, (req_id, kind, _payload)), (ok, value) in zip(requests, answers, strict=True):
            if not ok:
                value = str(value)
            elif kind == WRITE:
                value = [(r.changed, r.count, r.state, r.seq) for r in value]
            frames.setdefault(peer.sock.fileno(), []).append(
                _frame((req_id, ok, value, counters)))
        for fd, out in frames.items():
            to = peers.get(fd)
            if to is None:
                continue
            try:
                to.sock.sendall(b"".join(out))
            except OSError:
                self._drop(sel, peers, to)


def _groups(jobs: list[Job], max_ops: int) -> list[list[Job]]:
    """Jobs in order, cut into groups of at most ``max_ops`` operations (a larger job alone)."""
    groups: list[list[Job]] = []
    weight = max_ops
    for job in jobs:
        if weight + job.weight > max_ops:
            groups.append([])
            weight = 0
        groups[-1].append(job)
        weight += job.weight
    return groups


def child_main(sock: socket.socket, config: WriterConfig) -> None:
    """The child process: serve the server's writes until it says stop or goes away."""
    logs.setup(config.log_level)  # the server's structured logs, on the same stderr
    tune_gc()  # as in the server: a writer batch allocates as many objects as requests do
    _Child(config).run(sock)


# -- the server's side ----------------------------------------------------------------------------

class WriterProcess:
    """The server's handle on the child: sends requests, matches answers, restarts a dead child."""

    def __init__(self, config: WriterConfig) -> None:
        self.config = config
        self.commits = self.committed_ops = self.failed_commits = 0  # the child's, as last told
        self.syncs = 0  # its WAL syncs (one a round)
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
