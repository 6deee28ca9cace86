"""Partition workers: exactly-once from an at-least-once log, fenced zombies, Redis written after."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path

import pytest

from tally.core.coalesce import Batch
from tally.core.model import CountKey, Event
from tally.store.jetstream.eventlog import EventLog, partition_of
from tally.store.postgres.leases import PgLeases
from tally.store.rediscache.counts import RedisCounts
from tally.store.sqlite.store import SqliteStore
from tally.workers.partitions import PartitionPool, PartitionWorker, consumer_name, stream_position
from tests.helpers import open_sqlite

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

PARTITIONS = 4


def events(source: str, seqs: range) -> list[Event]:
    return [Event(seq=s, counter="like", item=f"post:{s % 13}", user=f"u{s}",
                  delta=1 if s % 5 else -1, ts=time.time(), region="eu", source=source)
            for s in seqs]


def expected(evs: list[Event]) -> dict[CountKey, int]:
    total: Counter[CountKey] = Counter()
    for e in evs:
        total[(e.counter, e.item)] += e.delta
    return dict(total)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    async with open_sqlite(tmp_path / "counts.db") as s:
        yield s


@pytest.fixture
async def log(nats_url: str) -> AsyncIterator[EventLog]:
    ev = EventLog(nats_url, "T_AGG", PARTITIONS)
    await ev.start()
    yield ev
    await ev.close()


async def settled(store: SqliteStore, log: EventLog, timeout_s: float = 20.0) -> None:
    """Until every partition's committed stream position is its newest message."""
    deadline = time.monotonic() + timeout_s
    last = await log.last_seqs()
    while True:
        done = [(await store.watermarks(consumer_name(p))).get(stream_position(p), 0) >= seq
                for p, seq in last.items()]
        if all(done):
            return
        assert time.monotonic() < deadline, "partitions did not catch up"
        await asyncio.sleep(0.05)


async def test_redelivered_and_overlapping_runs_are_applied_once(
        store: SqliteStore, log: EventLog, redis_url: str,
        pg_database: Callable[[], str]) -> None:
    s0, s1 = events("s0", range(1, 401)), events("s1", range(1, 201))
    await log.publish("s0", s0[:250])
    await log.publish("s1", s1)
    await log.publish("s0", s0[199:])  # a relay retry overlapping what was stored: seq 200-250
    await log.publish("s1", s1[100:])  # a zombie relay republishing an old batch
    cache = RedisCounts(redis_url)
    await cache.start()
    pool = PartitionPool(PgLeases(pg_database()), log, store, cache, window_s=0.01, rollups=["day"])
    pool.start()
    try:
        await settled(store, log)
        want = expected(s0 + s1)
        assert await store.get(list(want)) == {k: v for k, v in want.items()}
        deadline = time.monotonic() + 10  # Redis is written just after each commit
        while await cache.get(list(want)) != want:
            assert time.monotonic() < deadline, "Redis never got the applied counts"
            await asyncio.sleep(0.02)
        assert sum(w.stats.skipped for w in pool.workers.values()) == 51 + 100
        assert len(pool.workers) == PARTITIONS
    finally:
        await pool.stop()
        await cache.close()


async def test_cache_writes_lost_by_a_redis_restart_are_put_again(
        store: SqliteStore, log: EventLog, redis_url: str,
        pg_database: Callable[[], str]) -> None:
    """Redis comes back with an earlier state of its data (a power cut under appendfsync
    everysec keeps a prefix of its writes): the counts and marks as they were before the last
    batches. The workers see their marks behind and re-put those keys from the store; nothing
    else changes them (no more events, a TTL of an hour)."""
    s0 = events("s0", range(1, 301))
    await log.publish("s0", s0[:200])
    cache = RedisCounts(redis_url, ttl_s=3600)
    await cache.start()
    pool = PartitionPool(PgLeases(pg_database()), log, store, cache, window_s=0.01, rollups=[])
    pool.start()
    try:
        await settled(store, log)
        want = expected(s0[:200])
        deadline = time.monotonic() + 10
        while await cache.get(list(want)) != want:
            assert time.monotonic() < deadline, "Redis never got the applied counts"
            await asyncio.sleep(0.02)
        names = [f"tc:{{{item}}}:{counter}" for counter, item in want]
        names += [f"tc:mark:{consumer_name(p)}" for p in range(PARTITIONS)]
        snapshot = dict(zip(names, await cache.client.mget(names), strict=True))
        assert all(v is not None for v in snapshot.values())
        await log.publish("s0", s0[200:])
        await settled(store, log)
        want = expected(s0)
        while await cache.get(list(want)) != want:
            assert time.monotonic() < deadline, "Redis never got the applied counts"
            await asyncio.sleep(0.02)
        await cache.client.mset(snapshot)  # the restart: back to the earlier prefix
        assert await cache.get(list(want)) != want
        deadline = time.monotonic() + 10
        while await cache.get(list(want)) != want:
            assert time.monotonic() < deadline, "the lost cache writes were never put again"
            await asyncio.sleep(0.05)
        assert sum(w.stats.cache_losses for w in pool.workers.values()) >= 1
        assert sum(w.stats.cache_reputs for w in pool.workers.values()) >= 1
    finally:
        await pool.stop()
        await cache.close()


async def test_two_workers_on_one_partition_never_double_apply(store: SqliteStore,
                                                               log: EventLog) -> None:
    """No lease at all: the conditional watermark update alone keeps the counts exact."""
    evs = [e for e in events("s0", range(1, 3001)) if partition_of(e.counter, e.item, PARTITIONS) == 0]
    workers = [PartitionWorker(0, log, store, None, window_s=0.0, rollups=()) for _ in range(2)]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        for start in range(0, len(evs), 40):  # many small messages, applied while both race
            await log.publish("s0", evs[start:start + 40])
        await settled(store, log)
        # A commit is visible to readers before the worker that made it is told: let the
        # workers count their last round before they are cancelled.
        deadline = time.monotonic() + 10
        while sum(w.stats.events for w in workers) < len(evs) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    want = expected(evs)
    assert await store.get(list(want)) == want
    assert sum(w.stats.events for w in workers) == len(evs)  # each event applied by exactly one


class CommitAnswerLost:
    """A count store whose first batch commits and is then refused, as PostgreSQL's store does
    when the primary dies after a commit and before its answer: ``PgCluster.retrying`` runs the
    transaction again on the promoted standby, which finds the watermarks already moved."""

    def __init__(self, inner: SqliteStore) -> None:
        self.inner = inner
        self.lost: dict[CountKey, int] | None = None  # what the lost answer held

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def get(self, keys: Sequence[CountKey]) -> dict[CountKey, int]:
        return await self.inner.get(keys)

    async def watermarks(self, consumer: str) -> dict[str, int]:
        return await self.inner.watermarks(consumer)

    async def rollups(self, counter: str, item_type: str, dimension: str) -> dict[str, int]:
        return await self.inner.rollups(counter, item_type, dimension)

    async def apply_batch(self, batch: Batch, consumer: str,
                          expect: Mapping[str, int]) -> dict[CountKey, int] | None:
        new = await self.inner.apply_batch(batch, consumer, expect)
        if self.lost is None and new:
            self.lost = new
            return await self.inner.apply_batch(batch, consumer, expect)  # the retry's refusal
        return new


async def test_a_batch_whose_commit_answer_was_lost_still_reaches_the_cache(
        store: SqliteStore, log: EventLog, redis_url: str) -> None:
    """The worker takes the refusal for a fence and starts over from the committed position,
    past the batch: the cache must still get the batch's counts (no later event changes them,
    and the TTL is an hour)."""
    evs = [e for e in events("s0", range(1, 301)) if partition_of(e.counter, e.item, PARTITIONS) == 0]
    await log.publish("s0", evs)
    cache = RedisCounts(redis_url, ttl_s=3600)
    await cache.start()
    flaky = CommitAnswerLost(store)
    worker = PartitionWorker(0, log, flaky, cache, window_s=0.0, rollups=())
    task = asyncio.create_task(worker.run())
    try:
        await settled(store, log)
        want = expected(evs)
        assert await store.get(list(want)) == want
        assert flaky.lost, "no batch was refused after its commit"
        deadline = time.monotonic() + 10
        while (got := await cache.get(list(want))) != want:
            assert time.monotonic() < deadline, (
                f"cache stale after a refused retry: {got} != {want}")
            await asyncio.sleep(0.05)
        assert worker.stats.fenced == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await cache.close()
