"""Partitioned aggregators: each partition of the event log is applied by one process at a time.

A ``PartitionPool`` takes partition leases (``LeaseSet``) and runs a ``PartitionWorker`` for
each partition it holds. A worker:

1. reads the partition consumer's watermarks (``agg-p<n>``): one per source shard, plus the
   stream position (``js:p<n>``) it has applied up to;
2. reads the partition from the stream after that position;
3. every window, coalesces what arrived (events at or below a source's watermark are skipped:
   redeliveries and relay retries) and calls ``CountStore.apply_batch`` with the new positions
   and ``expect`` = the positions it started from. The store moves the watermarks and adds the
   deltas in one transaction, only if the watermarks are still where this worker left them;
4. writes the new absolute counts to the count cache (Redis), versioned by log position, under
   the partition's cache mark; and at most every second (first on taking the partition) reads
   the mark back. A mark below what this worker set (or, on taking the partition, below the
   committed position) means the cache lost puts it had acknowledged (Redis restarted without
   its last second, or a predecessor died between its commit and its cache write): the worker
   re-reads the log from the mark to the committed position and re-puts those keys' counts
   from the count store, at the committed position as version, so no value goes back.

With regions, a partition holds every region's changes (source names start with the origin
region), and step 3 first writes the other regions' toggle changes not yet applied into the
local like records (``RegionStore.apply_remote``, idempotent and order-free, so a crash before the
commit that repeats them is harmless): every region keeps a replica of every like record.

The conditional watermark update is the fence: a worker that lost its lease but has not noticed
yet (a zombie) finds the watermarks moved by its successor, writes nothing, and stops. A crash
before the commit loses nothing (the successor reads the same messages again); after it,
nothing is applied twice (the watermarks moved with the counts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tally.core.coalesce import coalesce
from tally.core.errors import Unavailable
from tally.core.model import CountKey, Event
from tally.store.ports import (
    CountCache,
    CountStore,
    Leases,
    LogGap,
    LogMessage,
    LogReader,
    PartitionedLog,
    RegionStore,
)
from tally.workers.leases import LeaseSet, cancelled, stop_task

log = logging.getLogger("tally.partitions")

FETCH_MSGS = 256
MAX_DIRTY = 100_000
MARK_CHECK_S = 1.0  # a lost cache write is seen within this (plus the re-put)
# Log positions re-read at most to re-put after a cache loss: a restart loses about a second of
# puts; a longer outage (dirty values dropped) beyond this is left to the TTL.
REPUT_SPAN = 100_000


class Fenced(Exception):
    """Another worker moved this partition's watermarks: this one must stop applying."""


@dataclass
class PartitionStats:
    events: int = 0
    batches: int = 0
    skipped: int = 0
    fenced: int = 0
    pending_msgs: int = 0
    lag_seconds: float = 0.0
    gained_at: float = 0.0  # wall clock when this process took the lease
    reading_at: float | None = None  # reader open at the committed position after taking it
    first_apply_at: float | None = None  # first batch applied after taking it
    last_error: str | None = None
    cache_write_failures: int = 0
    cache_losses: int = 0  # times the cache mark was found below what was put
    cache_reputs: int = 0  # counts re-put from the count store after a loss


def consumer_name(partition: int) -> str:
    return f"agg-p{partition}"


def stream_position(partition: int) -> str:
    """The watermark name under which a partition's log position is kept with the counts."""
    return f"js:p{partition}"


class PartitionWorker:
    def __init__(self, partition: int, events: PartitionedLog, counts: CountStore,
                 cache: CountCache | None, window_s: float, rollups: Sequence[str],
                 remote: RemoteRecords | None = None) -> None:
        self.partition = partition
        self.remote = remote
        self.events = events
        self.counts = counts
        self.cache = cache
        self.window_s = window_s
        self.rollups = tuple(rollups)
        self.consumer = consumer_name(partition)
        self.stats = PartitionStats(gained_at=time.time())
        self._dirty: dict[CountKey, tuple[int, int]] = {}  # cache writes to retry
        # Keys of a batch whose apply raised: it may have committed (and been rolled forward
        # since), so their cached values are rewritten from the count store before going on.
        self._unsure: tuple[list[CountKey], int] | None = None
        self._mark: int | None = None  # the cache mark as this worker last set or found it
        self._mark_checked = 0.0  # monotonic time of the last read of the mark (0: due now)
        self._reput_from: int | None = None  # a loss seen: re-put the log's keys after this

    async def run(self) -> None:
        """Apply the partition until cancelled; restarts from the committed position on errors."""
        while True:
            reader: LogReader | None = None
            try:
                marks = await self.counts.watermarks(self.consumer)  # rolls forward intents
                await self._settle_unsure(marks)
                reader = await self.events.reader(self.partition,
                                                  marks.get(stream_position(self.partition), 0))
                self.stats.reading_at = self.stats.reading_at or time.time()
                await self._apply_loop(reader, marks)
            except asyncio.CancelledError:
                # Stopped (a lease given back): a batch committed but not yet in the cache would
                # leave the cache behind the count store until the key's next change or its TTL.
                await self._flush_on_stop()
                raise
            except Fenced:  # a zombie predecessor, or we are one: the lease set decides which
                self.stats.fenced += 1
                log.warning("partition fenced: its watermarks moved under this worker; re-reading",
                            extra={"partition": self.partition})
                await asyncio.sleep(0.2)
            except Exception as exc:  # LogGap, a lost connection, a failed commit: start over
                if cancelled():
                    raise asyncio.CancelledError from exc
                self.stats.last_error = repr(exc)
                level = logging.INFO if isinstance(exc, LogGap) else logging.WARNING
                log.log(level, "partition round failed; resuming from the committed position",
                        extra={"partition": self.partition, "error": repr(exc)})
                await asyncio.sleep(0.2)
            finally:
                if reader is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(reader.close())

    async def _flush_on_stop(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.shield(asyncio.wait_for(self._settle_and_flush(), 2.0))

    async def _settle_and_flush(self) -> None:
        if self._unsure is not None:
            await self._settle_unsure(await self.counts.watermarks(self.consumer))
        await self._flush_dirty()

    async def _apply_loop(self, reader: LogReader, marks: dict[str, int]) -> None:
        while True:
            await self._check_cache(marks)
            started = time.monotonic()
            msgs = await reader.fetch(FETCH_MSGS, timeout_s=max(self.window_s, 0.5))
            if not msgs:
                self.stats.lag_seconds = 0.0
                self.stats.pending_msgs = 0
                await self._flush_dirty()
                continue
            await self._apply(msgs, marks)
            rest = self.window_s - (time.monotonic() - started)
            if len(msgs) < FETCH_MSGS and rest > 0:
                await asyncio.sleep(rest)  # let the window gather more deltas per key

    async def _apply(self, msgs: list[LogMessage], marks: dict[str, int]) -> int:
        """One window's messages: coalesce, apply with the watermarks, then set the cache."""
        self.stats.pending_msgs = msgs[-1].pending
        self.stats.lag_seconds = max(time.time() - msgs[0].stored_at, 0.0)
        events = [ev for m in msgs for ev in m.events]
        if self.remote is not None:
            await self.remote.apply(events, marks)
        batch = coalesce(events, self.rollups, marks)
        batch.positions[stream_position(self.partition)] = msgs[-1].stream_seq
        self._unsure = (list(batch.deltas), msgs[-1].stream_seq)
        new = await self.counts.apply_batch(batch, self.consumer, marks)
        if new is None:
            # ``_unsure`` stays set: a store retries a transaction whose connection was lost at
            # its commit (a primary killed), and when that commit had landed the retry finds the
            # watermarks moved and refuses, exactly as it refuses a zombie. The batch may then be
            # applied with nothing in the cache, and the cache mark, set by this worker, does not
            # show it. The restart's settle rewrites these keys from the store.
            raise Fenced(self.partition)
        self._unsure = None
        marks.update(batch.positions)
        self._record(batch.events, batch.skipped)
        await self._write_cache(new, msgs[-1].stream_seq)
        return batch.events

    async def drain(self) -> int:
        """Apply everything the partition holds now, then return: for tests and tools."""
        last = (await self.events.last_seqs()).get(self.partition, 0)
        marks = await self.counts.watermarks(self.consumer)
        await self._settle_unsure(marks)
        reader = await self.events.reader(self.partition,
                                          marks.get(stream_position(self.partition), 0))
        total = 0
        try:
            while reader.position < last:
                msgs = await reader.fetch(FETCH_MSGS, timeout_s=5.0)
                if not msgs:
                    raise TimeoutError(f"partition {self.partition}: stalled at "
                                       f"{reader.position} of {last}")
                total += await self._apply(msgs, marks)
        finally:
            await reader.close()
        return total

    def _record(self, events: int, skipped: int) -> None:
        self.stats.events += events
        self.stats.skipped += skipped
        self.stats.batches += 1
        if self.stats.first_apply_at is None:
            self.stats.first_apply_at = time.time()
            log.info("partition resumed", extra={
                "partition": self.partition,
                "after_lease_s": round(self.stats.first_apply_at - self.stats.gained_at, 3),
                "reading_after_lease_s": round((self.stats.reading_at or 0) - self.stats.gained_at, 3)})

    async def _settle_unsure(self, marks: dict[str, int]) -> None:
        """Rewrite the cache of a batch whose commit had an unknown outcome, from the store.

        The version is the partition's committed position read (in ``marks``) before the
        counts: the values hold at least that much of the log. The batch's own last sequence
        would claim more when the batch did not commit, and the re-applied batch, read again in
        other chunks, could then end below it and be refused by the cache: stale for good.
        """
        if self._unsure is not None and self.cache is not None:
            keys, _ = self._unsure
            got = await self.counts.get(keys)
            await self._write_cache({k: got.get(k, 0) for k in keys},
                                    marks.get(stream_position(self.partition), 0))
        self._unsure = None

    async def _check_cache(self, marks: dict[str, int]) -> None:
        """Read the cache mark (at most every ``MARK_CHECK_S``); re-put what the cache lost.

        Failures wait for the next check: the cache is optional, applying goes on without it."""
        if self.cache is None or time.monotonic() - self._mark_checked < MARK_CHECK_S:
            return
        self._mark_checked = time.monotonic()
        committed = marks.get(stream_position(self.partition), 0)
        try:
            found = await self.cache.mark(self.consumer)
        except (Unavailable, OSError, TimeoutError):
            return
        expected = committed if self._mark is None else self._mark
        if self._reput_from is None and found is not None and found < expected:
            self._reput_from = found
            self.stats.cache_losses += 1
            log.warning("count cache lost writes (restarted?): re-putting from the count store",
                        extra={"partition": self.partition, "cache_mark": found,
                               "expected_mark": expected, "committed": committed})
        if self._reput_from is None:
            # None: a cache without this mark (new, emptied, or one that keeps none): the
            # next put creates it.
            self._mark = max(found or 0, self._mark or 0)
            return
        try:
            await self._reput(self._reput_from, committed)
        except (Unavailable, OSError) as exc:  # the cache or the store: retried next check
            log.warning("re-put after a cache loss failed; will retry",
                        extra={"partition": self.partition, "error": repr(exc)})
        except (LogGap, TimeoutError) as exc:  # the log no longer holds them: the TTL heals
            log.error("cannot re-read the log to re-put lost cache writes; the TTL heals them",
                      extra={"partition": self.partition, "error": repr(exc)})
            self._reput_from, self._mark = None, found or 0

    async def _reput(self, since: int, committed: int) -> None:
        """Counts, from the store, of every key the log changed in (since, committed], put at
        ``committed``: the store holds exactly that much of this partition's log (a zombie's
        store may hold more: the version still only claims what it holds)."""
        assert self.cache is not None
        started = time.monotonic()
        keys: set[CountKey] = set()
        reader = await self.events.reader(self.partition, max(since, committed - REPUT_SPAN))
        try:
            while reader.position < committed:
                msgs = await reader.fetch(FETCH_MSGS, timeout_s=5.0)
                if not msgs:
                    raise TimeoutError(f"partition {self.partition}: the log stopped at "
                                       f"{reader.position} before {committed}")
                keys.update((ev.counter, ev.item) for m in msgs if m.stream_seq <= committed
                            for ev in m.events)
        finally:
            with contextlib.suppress(Exception):
                await reader.close()
        got = await self.counts.get(list(keys))
        if await self.cache.put({k: got.get(k, 0) for k in keys}, committed, self.consumer,
                                floor=since):
            self._reput_from, self._mark = None, committed
        else:  # lost again meanwhile: the next check starts over from the mark found then
            self._reput_from, self._mark_checked = None, 0.0
        self.stats.cache_reputs += len(keys)
        log.info("count cache re-put", extra={"partition": self.partition, "since": since,
                                              "committed": committed, "keys": len(keys),
                                              "seconds": round(time.monotonic() - started, 3)})

    async def _write_cache(self, counts: dict[CountKey, int], version: int) -> None:
        if self.cache is None:
            return
        for key, value in counts.items():
            self._dirty[key] = (version, value)
        await self._flush_dirty()

    async def _flush_dirty(self) -> None:
        """Absolute values, so a failed write is simply retried later (or healed by the TTL)."""
        if self.cache is None or not self._dirty:
            return
        by_version: dict[int, dict[CountKey, int]] = {}
        for key, (version, value) in self._dirty.items():
            by_version.setdefault(version, {})[key] = value
        try:
            # Oldest first: the mark vouches for every put before it. No mark before the first
            # check, nor while a loss waits for its re-put: it would vouch for what is lost.
            for version in sorted(by_version):
                if self._mark is None or self._reput_from is not None:
                    await self.cache.put(by_version[version], version)
                elif await self.cache.put(by_version[version], version, self.consumer,
                                          floor=self._mark):
                    self._mark = max(self._mark, version)
                else:
                    self._mark_checked = 0.0  # lost puts under the mark: check (and re-put) now
            self._dirty.clear()
        except (Unavailable, OSError, TimeoutError) as exc:
            self.stats.cache_write_failures += 1
            if len(self._dirty) > MAX_DIRTY:
                self._dirty.clear()  # re-put from the mark once the cache is back
                if self._reput_from is None and self._mark is not None:
                    self._reput_from = self._mark
            log.warning("count cache write failed; will retry", extra={"error": repr(exc),
                                                                 "partition": self.partition})


@dataclass
class RemoteRecords:
    """Replicates other regions' toggle changes into this region's like records."""

    store: RegionStore
    region: str  # this region: its own sources start with f"{region}."
    applied: int = 0

    async def apply(self, events: Sequence[Event], marks: dict[str, int]) -> None:
        local = f"{self.region}."
        remote = [ev for ev in events
                  if not ev.source.startswith(local) and ev.seq > marks.get(ev.source, 0)]
        if remote:
            self.applied += await self.store.apply_remote(remote)


class PartitionPool:
    """The aggregator role: leases partitions and runs a worker per partition held."""

    def __init__(self, leases: Leases, events: PartitionedLog, counts: CountStore,
                 cache: CountCache | None, window_s: float, rollups: Sequence[str],
                 lease_period_s: float = 0.5, remote: RemoteRecords | None = None) -> None:
        self.events = events
        self.remote = remote
        self.counts = counts
        self.cache = cache
        self.window_s = window_s
        self.rollups = tuple(rollups)
        self.workers: dict[int, PartitionWorker] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        keys = [f"p{n}" for n in range(events.partitions)]
        self.leases = LeaseSet(leases, "aggregator", keys, self._gain, self._lose, lease_period_s)

    def start(self) -> None:
        self.leases.start()

    async def stop(self) -> None:
        await self.leases.stop()

    async def _gain(self, key: str) -> None:
        n = int(key[1:])
        worker = PartitionWorker(n, self.events, self.counts, self.cache, self.window_s,
                                 self.rollups, self.remote)
        self.workers[n] = worker
        self._tasks[n] = asyncio.create_task(worker.run(), name=f"tally-partition-{n}")

    async def _lose(self, key: str) -> None:
        n = int(key[1:])
        task = self._tasks.pop(n, None)
        self.workers.pop(n, None)
        if task is not None:
            await stop_task(task, f"partition {n}")

    def lag(self) -> tuple[int, float]:
        """(messages pending, oldest unapplied age in seconds) over the partitions held."""
        msgs = sum(w.stats.pending_msgs for w in self.workers.values())
        age = max((w.stats.lag_seconds for w in self.workers.values()), default=0.0)
        return msgs, age
