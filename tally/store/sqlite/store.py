"""The embedded backend: every storage role on SQLite in WAL mode, in two kinds of files.

The like records and their change log are one file per shard (``tally.db``, then
``tally-likes{k}.db``), each written by a likes writer in a process of its own
(``writer_process``); the counts, watermarks and rollups are another (``tally-counts.db``),
written here by the counts writer, which aggregates the logs in place. So aggregation never
queues in front of likes, and the likes writers' commits do not share the server's interpreter
lock. Reads use their own connections, so a read never waits for a commit.
"""

from __future__ import annotations

import asyncio
import errno
import sqlite3
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tally.core.coalesce import Batch
from tally.core.errors import ConfigError
from tally.core.model import CountKey, Event, Op, OpResult, ToggleOp
from tally.store.ports import Applied, ReconcileChunk
from tally.store.shards import logical_shard
from tally.store.sqlite.aggregate import apply_range, log_range
from tally.store.sqlite.checkpoint import BACKSTOP_PAGES, Checkpointer, settle_wal
from tally.store.sqlite.ops import SOURCE, log_head, source_of, stored_counts
from tally.store.sqlite.ops import watermark as _watermark
from tally.store.sqlite.reconcile import reconcile_chunk
from tally.store.sqlite.schema import connect, counts_path, likes_path, likes_schema
from tally.store.sqlite.writer import (
    MAX_OPS,
    GroupCommitWriter,
    Tx,
    WalSync,
    syncs_wal_itself,
)
from tally.store.sqlite.writer_process import (
    WriterClient,
    WriterConfig,
    WriterProcess,
    writer_socket,
)

T = TypeVar("T")

# Threads for the reads too large to run on the event loop (change-log pages, lag, rollups,
# watermarks): few, since the lookups that make up the request load run inline.
READ_THREADS = 4


@dataclass(slots=True)
class _Combined:
    """The operations of the requests that wrote in one event-loop turn, and who waits for what:
    (first operation, how many, the request's future)."""

    ops: list[Op] = field(default_factory=list)
    waiters: list[tuple[int, int, asyncio.Future[list[OpResult]]]] = field(default_factory=list)

    def deliver(self, done: asyncio.Future[list[OpResult]]) -> None:
        if done.cancelled():
            for _start, _n, waiter in self.waiters:
                waiter.cancel()
            return
        exc = done.exception()
        if exc is not None:
            self.fail(exc)
            return
        results = done.result()
        for start, n, waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(results[start:start + n])

    def fail(self, exc: BaseException) -> None:
        for _start, _n, waiter in self.waiters:
            if not waiter.done():
                waiter.set_exception(exc)


class SqliteStore:
    """Implements LikeStore, ChangeLog, CountStore and Recounter (see ``tally.store.ports``)."""

    def __init__(self, path: Path, *, synchronous: str = "FULL", likes_shards: int = 1,
                 log_level: str = "INFO", writers_dir: Path | None = None,
                 owner: bool = True) -> None:
        """With several API processes (``tally serve --workers N``), the first one is the
        ``owner``: it runs the likes writer processes (listening in ``writers_dir`` for the
        others), the checkpoints and the aggregation. The others (``owner=False``) write
        through those writers' sockets and read the files directly; each still has a counts
        writer for the admin jobs that write counts (a reconcile), which SQLite's file lock
        serialises with the owner's."""
        if likes_shards < 1:
            raise ConfigError("sqlite_likes_shards must be at least 1")
        self.path = Path(path)
        self.shards = likes_shards
        self.synchronous = synchronous.upper()
        self.syncs_wal_itself = syncs_wal_itself(self.synchronous)
        # A likes writer syncs after its round's commits, so a commit is visible for a moment
        # before it is durable. The counts derived from it must not be: after a power loss they
        # would hold events the log lost, and the next events would reuse those sequence
        # numbers below the watermark. So the counts writer syncs every likes file before each
        # commit of its own (a few a second): whatever it read had committed, so is then on
        # disk.
        self.likes_syncs = ([WalSync(likes_path(self.path, k)) for k in range(likes_shards)]
                            if self.syncs_wal_itself else [])
        self.likes_sync_error: OSError | None = None  # set once: see _sync_likes
        self.counts_writer = GroupCommitWriter(
            self._open_counts_writer, name="tally-sqlite-counts",
            before_commit=self._sync_likes if self.likes_syncs else None)
        files = {"counts": "main", **{likes_schema(k): likes_schema(k)
                                      for k in range(likes_shards)}}
        self.checkpointer = Checkpointer(lambda: self._connect(writes="counts"), files,
                                         halted=self._sync_failed)
        # One writer process per shard of the like records, each owning its file and keeping its
        # own account of the deltas the counts do not hold yet (exact answers).
        self.owner = owner
        configs = [WriterConfig(self.path, self.synchronous, shard, log_level,
                                writer_socket(writers_dir, shard) if writers_dir else None)
                   for shard in range(likes_shards)]
        self.writer_processes = [WriterProcess(c) if owner else WriterClient(c) for c in configs]
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._trimmed: dict[int, int] = {}  # per shard: the log position trimmed through
        self._readers: list[sqlite3.Connection] = []
        self.source = SOURCE
        self._combining: _Combined | None = None  # event loop thread only

    # -- lifecycle --------------------------------------------------------------------------

    def _sync_likes(self) -> None:
        """Before each counts commit: every likes WAL synced. A failure stops the counts until a
        restart, as the likes writers stop: the kernel may have dropped the pages it could not
        write and marked them clean, so the next sync succeeds without them, and counts derived
        from them would then outlive a power cut that the events did not. The same once a likes
        writer reports a failed sync of its own: its descriptor saw the error, ours may not."""
        if self.likes_sync_error is None and self._sync_failed():
            self.likes_sync_error = OSError(errno.EIO, "a likes writer's WAL sync or a "
                                                       "checkpoint's I/O failed")
        if self.likes_sync_error is not None:
            raise OSError(errno.EIO, f"counts stopped after a failed likes WAL sync: "
                                     f"{self.likes_sync_error}")
        try:
            for sync in self.likes_syncs:
                sync()
        except OSError as exc:
            self.likes_sync_error = exc
            raise

    def _sync_failed(self) -> bool:
        """A sync of the like records failed somewhere: in a likes writer, in the counts
        writer's own sync (``_sync_likes``), or in a checkpoint (whose sync may be the one that
        met the error, leaving the others to "succeed")."""
        return (self.likes_sync_error is not None or self.checkpointer.io_error is not None
                or any(p.sync_failed for p in self.writer_processes))

    def _connect(self, writes: str, readonly: bool = False) -> sqlite3.Connection:
        return connect(self.path, self.synchronous, readonly=readonly, writes=writes,
                       shards=self.shards)

    def _open_counts_writer(self) -> sqlite3.Connection:
        conn = self._connect(writes="counts")
        conn.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
        return conn

    async def start(self) -> None:
        if not self.owner:
            for proc in self.writer_processes:
                await proc.start()
            self.counts_writer.start()
            self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="tally-sqlite-read")
            return
        await self.writer_processes[0].start()  # shard 0 first: it creates or migrates the schema
        await asyncio.to_thread(self._check_shards)
        for proc in self.writer_processes[1:]:
            await proc.start()
        # Before the counts derive anything: what a restart can read must be on disk (settle_wal).
        for file in (counts_path(self.path), *(likes_path(self.path, k) for k in range(self.shards))):
            await asyncio.to_thread(settle_wal, file)
        self.counts_writer.start()
        self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="tally-sqlite-read")
        self.checkpointer.start()

    async def close(self) -> None:
        if self.owner:
            await asyncio.to_thread(self.checkpointer.stop)
        await self.counts_writer.stop()
        for proc in self.writer_processes:
            await proc.stop()
        for sync in self.likes_syncs:
            sync.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for conn in self._readers:
            conn.close()
        self._readers.clear()

    def _check_shards(self) -> None:
        """The like records stay split the way they were first split: a user's toggles must be
        found where ``logical_shard`` puts them. Before shards there was one file: a database
        with records and no setting was split in one."""
        conn = connect(self.path, self.synchronous)
        try:
            row = conn.execute("SELECT value FROM counts_meta WHERE key='likes_shards'").fetchone()
            if row is None:
                used = conn.execute("SELECT 1 FROM toggles LIMIT 1").fetchone() is not None
                stored = 1 if used else self.shards
                conn.execute("INSERT INTO counts_meta VALUES ('likes_shards', ?)", (str(stored),))
            else:
                stored = int(row[0])
        finally:
            conn.close()
        if stored != self.shards:
            raise ConfigError(f"the like records in {self.path.parent} are split over {stored} "
                              f"shard(s): sqlite_likes_shards must stay {stored}")

    def _shard_of(self, op: Op) -> int:
        """A toggle goes to its user's shard (has-liked for a feed is one query; a viral
        item's likes spread over every writer). An increment goes to its item's: one writer
        holds all of an item's increments, so their answers are exact, and a retry, which
        repeats the item, meets its idempotency key there."""
        return logical_shard(op.user if isinstance(op, ToggleOp) else op.item, self.shards)

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect(writes="counts", readonly=True)
            self._local.conn = conn
            self._readers.append(conn)
        return conn

    async def _run_read(self, fn: Callable[[sqlite3.Connection], T], small: bool = False) -> T:
        """Runs a read on a reader connection: ``small`` ones (indexed lookups bounded by the
        batch limits) on the calling event loop, the rest in the read threads. Handing a short
        lookup to a thread costs more than the lookup, and under load the thread then waits for
        the interpreter lock. WAL readers never wait for a writer, so an inline read does not
        stall the loop behind a commit."""
        if self._pool is None:
            raise RuntimeError("store is not started")
        if small:
            return fn(self._reader())
        return await asyncio.get_running_loop().run_in_executor(self._pool,
                                                                lambda: fn(self._reader()))

    async def _read(self, sql: str, params: Sequence[Any], small: bool = False) -> list[Any]:
        return await self._run_read(lambda conn: conn.execute(sql, params).fetchall(), small)

    # -- LikeStore --------------------------------------------------------------------------

    async def write(self, ops: Sequence[Op]) -> list[OpResult]:
        """Joins the operations of every request that writes in the same event-loop turn into
        one writer job (see ``tally.store.sqlite.ops``); each request gets its own slice back."""
        loop = asyncio.get_running_loop()
        batch = self._combining
        if batch is None or len(batch.ops) + len(ops) > MAX_OPS:
            if batch is not None:
                self._flush()
            batch = self._combining = _Combined()
            loop.call_soon(self._flush)
        waiter: asyncio.Future[list[OpResult]] = loop.create_future()
        batch.waiters.append((len(batch.ops), len(ops), waiter))
        batch.ops.extend(ops)
        return await waiter

    def _flush(self) -> None:
        batch, self._combining = self._combining, None
        if batch is None:
            return
        try:
            if self.shards == 1:
                done = self.writer_processes[0].write(batch.ops)
            else:
                done = self._write_sharded(batch.ops)
        except Exception as exc:
            batch.fail(exc)
            return
        done.add_done_callback(batch.deliver)

    def _write_sharded(self, ops: list[Op]) -> asyncio.Future[list[OpResult]]:
        """Each shard's operations to its writer, the answers back in the operations' order.
        Each shard commits on its own: a failure can leave a request written on some shards,
        and it then fails as a whole (safe to retry, as across PostgreSQL shards)."""
        parts: dict[int, list[int]] = {}
        for i, op in enumerate(ops):
            parts.setdefault(self._shard_of(op), []).append(i)
        loop = asyncio.get_running_loop()
        futures = [(idx, self.writer_processes[shard].write([ops[i] for i in idx]))
                   for shard, idx in parts.items()]
        gathered = asyncio.gather(*(fut for _idx, fut in futures))
        out: asyncio.Future[list[OpResult]] = loop.create_future()

        def merge(done: asyncio.Future[list[list[OpResult]]]) -> None:
            if out.done():
                return
            if done.cancelled():
                out.cancel()
            elif (exc := done.exception()) is not None:
                out.set_exception(exc)
            else:
                results: list[OpResult | None] = [None] * len(ops)
                for (idx, _fut), part in zip(futures, done.result(), strict=True):
                    for i, result in zip(idx, part, strict=True):
                        results[i] = result
                out.set_result([r for r in results if r is not None])

        gathered.add_done_callback(merge)
        return out

    async def has(self, counter: str, user: str, items: Sequence[str]) -> list[bool]:
        marks = ",".join("?" * len(items))
        schema = likes_schema(logical_shard(user, self.shards))
        rows = await self._read(f"SELECT item FROM {schema}.toggles WHERE counter=? AND user=? "
                                f"AND state=1 AND item IN ({marks})", [counter, user, *items],
                                small=True)
        on = {r[0] for r in rows}
        return [item in on for item in items]

    async def purge_idempotency(self) -> int:
        """Forget idempotency keys whose window has passed; returns how many."""
        return sum([await proc.purge() for proc in self.writer_processes])

    # -- ChangeLog --------------------------------------------------------------------------

    async def read(self, after_seq: int, limit: int) -> list[Event]:
        """Shard 0's log. With more shards the logs are aggregated in place (``aggregate``):
        there is no one log to read in order."""
        if self.shards > 1:
            raise ConfigError("a store with several like-record shards has one log per shard; "
                              "it is aggregated in place")

        def run(conn: sqlite3.Connection) -> list[Event]:  # in a read thread, objects and all
            rows = conn.execute("SELECT seq, counter, item, user, delta, ts, region FROM "
                                "likes.changelog WHERE seq > ? ORDER BY seq LIMIT ?",
                                (after_seq, limit))
            return [Event(seq, counter, item, user, delta, ts, region, SOURCE)
                    for seq, counter, item, user, delta, ts, region in rows]

        return await self._run_read(run)

    async def head(self) -> int:
        """The newest sequence number of each shard's log, summed (each numbers its own)."""
        return await self._run_read(
            lambda conn: sum(log_head(conn, likes_schema(k)) for k in range(self.shards)))

    async def lag(self, consumer: str) -> tuple[int, int, float | None]:
        """(events logged, events the consumer applied, oldest unapplied event's time), over
        every shard's log."""
        def run(conn: sqlite3.Connection) -> tuple[int, int, float | None]:
            head = applied = 0
            oldest: float | None = None
            for k in range(self.shards):
                schema, mark = likes_schema(k), _watermark(conn, consumer, source_of(k))
                head += log_head(conn, schema)
                applied += mark
                row = conn.execute(f"SELECT ts FROM {schema}.changelog WHERE seq > ? "
                                   f"ORDER BY seq LIMIT 1", (mark,)).fetchone()
                if row is not None and (oldest is None or row[0] < oldest):
                    oldest = float(row[0])
            return head, applied, oldest

        return await self._run_read(run)

    # -- CountStore -------------------------------------------------------------------------

    async def get(self, keys: Sequence[CountKey]) -> dict[CountKey, int]:
        if not keys:
            return {}
        return await self._run_read(lambda conn: stored_counts(conn, keys), small=True)

    async def watermarks(self, consumer: str) -> dict[str, int]:
        rows = await self._read("SELECT source, seq FROM watermarks WHERE consumer=?", (consumer,))
        return {s: int(n) for s, n in rows}

    async def apply_batch(self, batch: Batch, consumer: str,
                          expect: Mapping[str, int]) -> dict[CountKey, int] | None:
        result: dict[CountKey, int] | None = await self.counts_writer.run(
            lambda c, _tx: self._apply_batch(c, batch, consumer, expect), weight=1)
        if result is not None:
            await self._trim({k: batch.positions[source_of(k)] for k in range(self.shards)
                              if source_of(k) in batch.positions})
        return result

    def _apply_batch(self, conn: sqlite3.Connection, batch: Batch, consumer: str,
                     expect: Mapping[str, int]) -> dict[CountKey, int] | None:
        stored = dict(conn.execute("SELECT source, seq FROM watermarks WHERE consumer=?",
                                   (consumer,)).fetchall())
        if any(stored.get(src, 0) != expect.get(src, 0) for src in batch.positions):
            return None
        conn.executemany("INSERT INTO counts (item, counter, count) VALUES (?,?,?) ON CONFLICT "
                         "(counter, item) DO UPDATE SET count=count+excluded.count",
                         [(item, counter, d) for (counter, item), d in batch.deltas.items()])
        new = stored_counts(conn, list(batch.deltas))
        conn.executemany("INSERT INTO rollups VALUES (?,?,?,?,?) ON CONFLICT DO UPDATE "
                         "SET value=value+excluded.value",
                         [(*key, d) for key, d in batch.rollups.items()])
        conn.executemany("INSERT INTO watermarks VALUES (?,?,?) ON CONFLICT (consumer, source) "
                         "DO UPDATE SET seq=excluded.seq",
                         [(consumer, src, seq) for src, seq in batch.positions.items()])
        return new

    async def _trim(self, positions: Mapping[int, int]) -> None:
        """Applied events leave each shard's log (through the position applied); the likes
        writer owns that file. Every round passes every shard's watermark, not only the ones it
        moved: a round cancelled between its commit and its trim (a stop, a crash) leaves
        events below the watermark, where nothing reads them, and the next round trims them."""
        for shard, through_seq in positions.items():
            if through_seq > self._trimmed.get(shard, 0):
                await self.writer_processes[shard].trim(through_seq)
                self._trimmed[shard] = through_seq

    # -- InPlaceAggregation -----------------------------------------------------------------

    async def aggregate(self, consumer: str, limit: int, rollups: Collection[str]) -> Applied:
        """One round over every shard's log; ``Applied.position`` is the positions' sum."""
        applied, positions = await self.counts_writer.run(
            lambda c, _tx: self._aggregate(c, consumer, limit, rollups))
        await self._trim(positions)
        return applied  # type: ignore[no-any-return]

    def _aggregate(self, conn: sqlite3.Connection, consumer: str, limit: int,
                   rollups: Collection[str]) -> tuple[Applied, dict[int, int]]:
        """One round in the counts writer's transaction, over its snapshot of the logs: the
        watermarks read here cannot move under it (this writer is the only one that moves
        them). Each shard's log in turn, ``limit`` events at most from each."""
        total = Applied(0, 0, {}, None)
        marks: dict[int, int] = {}  # every shard's watermark after the round
        for shard in range(self.shards):
            schema, source = likes_schema(shard), source_of(shard)
            after = _watermark(conn, consumer, source)
            events, upto, oldest = log_range(conn, after, limit, schema)
            total.position += upto
            marks[shard] = after
            if not events:
                continue
            new = apply_range(conn, after, upto, rollups, schema)
            conn.execute("INSERT INTO watermarks VALUES (?,?,?) ON CONFLICT (consumer, source) "
                         "DO UPDATE SET seq=excluded.seq", (consumer, source, upto))
            marks[shard] = upto
            total.events += events
            total.counts.update(new)  # later shards' rounds read the earlier ones' counts
            if oldest is not None and (total.oldest_ts is None or oldest < total.oldest_ts):
                total.oldest_ts = oldest
        return total, marks

    async def rollups(self, counter: str, item_type: str, dimension: str) -> dict[str, int]:
        rows = await self._read("SELECT bucket, value FROM rollups WHERE counter=? AND item_type=? "
                                "AND dimension=? ORDER BY bucket", (counter, item_type, dimension))
        return {b: v for b, v in rows}

    # -- Recounter --------------------------------------------------------------------------

    async def reconcile_chunk(self, counters: Sequence[str], items: Sequence[str] | None,
                              after: tuple[str, str] | None, limit: int,
                              repair: bool) -> ReconcileChunk:
        def job(conn: sqlite3.Connection, tx: Tx) -> ReconcileChunk:
            logs = [(likes_schema(k), _watermark(conn, None, source_of(k)))
                    for k in range(self.shards)]
            return reconcile_chunk(conn, logs, list(counters), items, after, limit, repair)

        chunk: ReconcileChunk = await self.counts_writer.run(job)
        return chunk

    # -- metrics ----------------------------------------------------------------------------

    def write_stats(self) -> tuple[int, int, int]:
        """(group commits, operations committed, failed commits) of the likes writers."""
        writers = self.writer_processes
        return (sum(w.commits for w in writers), sum(w.committed_ops for w in writers),
                sum(w.failed_commits for w in writers))

    def sync_stats(self) -> tuple[int, int]:
        """(the likes writers' WAL syncs, likes writers stopped by a failed sync)."""
        return (sum(p.syncs for p in self.writer_processes),
                sum(p.sync_failed for p in self.writer_processes))
