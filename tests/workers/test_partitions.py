"""Partition workers: exactly-once from an at-least-once log, fenced zombies, Redis written after."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

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
