"""The relay: outbox rows reach the log in order, are trimmed, and survive a NATS crash."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tally.core.model import CountKey, Event, ToggleOp
from tally.store.jetstream.eventlog import EventLog
from tally.store.postgres.cluster import PgCluster
from tally.store.postgres.leases import PgLeases
from tally.store.postgres.likes import PostgresLikeStore
from tally.store.shards import ShardMap
from tally.store.sqlite.store import SqliteStore
from tally.workers.partitions import PartitionPool
from tally.workers.relay import GroupRelay, Relay
from tally_dev.engines import NatsEngine
from tests.engines import EngineFactory

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


@pytest.fixture
async def likes(pg_dsns: list[str]) -> AsyncIterator[PostgresLikeStore]:
    store = PostgresLikeStore(PgCluster(pg_dsns, ShardMap.build(64, 2)), outbox_slots=2)
    await store.start()
    yield store
    await store.close()


def toggles(n: int, items: int = 9) -> list[ToggleOp]:
    return [ToggleOp("like", f"post:{i % items}", f"u{i}", True, "eu") for i in range(n)]


async def until(cond: Callable[[], object], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await cond():  # type: ignore[misc]
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def outbox_empty(likes: PostgresLikeStore) -> bool:
    for source in likes.sources():
        if await likes.pending(source, 0, 1):
            return False
    return True


async def test_rows_are_published_in_source_order_then_trimmed(
        likes: PostgresLikeStore, nats_url: str, pg_database: Callable[[], str]) -> None:
    log = EventLog(nats_url, "T_RELAY", 3)
    await log.start()
    lease_db = PgLeases(pg_database())
    relays = [Relay(lease_db, likes, log, batch=50, lease_period_s=0.05) for _ in range(2)]
    for relay in relays:
        relay.start()

    async def shared() -> bool:  # two relays: each owns half the sources
        return all(len(r.sources) == len(likes.sources()) // 2 for r in relays)

    try:
        await until(shared)
        for start in range(0, 300, 30):
            await likes.write(toggles(300)[start:start + 30])
        await until(lambda: outbox_empty(likes))
        assert all(sum(s.stats.published for s in r.sources.values()) > 0 for r in relays)
    finally:
        for relay in relays:
            await relay.stop()
    seen: list[tuple[str, int]] = []
    for p in range(3):
        reader = await log.reader(p, 0)
        while msgs := await reader.fetch(100, 0.3):
            part = [(e.source, e.seq) for m in msgs for e in m.events]
            for source in likes.sources():
                seqs = [s for src, s in part if src == source]
                assert seqs == sorted(seqs), "a source's events out of order in a partition"
            seen.extend(part)
        await reader.close()
    assert len(seen) == len(set(seen)) == 300
    await log.close()


async def test_a_nats_crash_mid_relay_loses_and_doubles_nothing(
        likes: PostgresLikeStore, engine_factory: EngineFactory, tmp_path: Path,
        pg_database: Callable[[], str]) -> None:
    nats = engine_factory(NatsEngine)
    nats.start()
    log = EventLog(nats.url, "T_CRASH", 4, publish_timeout_s=1.0)
    await log.start()
    counts = SqliteStore(tmp_path / "counts.db")
    await counts.start()
    lease_db = PgLeases(pg_database())
    relay = Relay(lease_db, likes, log, batch=20, lease_period_s=0.05)
    pool = PartitionPool(lease_db, log, counts, None, window_s=0.01, rollups=())
    relay.start()
    pool.start()
    ops = toggles(600) + [ToggleOp("like", f"post:{i % 9}", f"u{i}", False, "eu")
                          for i in range(0, 600, 3)]
    try:
        for n, start in enumerate(range(0, len(ops), 20)):
            await likes.write(ops[start:start + 20])
            if n == 10:
                nats.kill()  # the stream is fsynced: acknowledged messages survive
            if n == 20:
                nats.start()
            await asyncio.sleep(0.2 if 10 <= n < 20 else 0.01)  # writes go on during the outage
        want: Counter[CountKey] = Counter()
        for op in ops:
            want[("like", op.item)] += 1 if op.on else -1

        async def converged() -> bool:
            return await counts.get(list(want)) == dict(want)

        await until(converged, timeout_s=60)
        await until(lambda: outbox_empty(likes))
        assert sum(s.stats.failures for s in relay.sources.values()) > 0  # it did retry
    finally:
        await pool.stop()
        await relay.stop()
        await log.close()
        await counts.close()


async def test_a_round_trims_what_the_round_before_published(
        likes: PostgresLikeStore, nats_url: str) -> None:
    """The running relay's trim rides on its next read; ``step`` trims at once."""
    log = EventLog(nats_url, "T_FOLD", 3)
    await log.start()
    try:
        group = likes.source_groups()[0]
        relay = GroupRelay(group, likes, log)
        await likes.write(toggles(20))
        first = sum([len(await likes.pending(s, 0, 1000)) for s in group])
        assert first and (await relay.round())[0] == first
        assert sum([len(await likes.pending(s, 0, 1000)) for s in group]) == first  # not yet
        await likes.write(toggles(40)[20:])
        second = sum([len(await likes.pending(s, 0, 1000)) for s in group]) - first
        assert (await relay.round())[0] == second
        left = [e.seq for s in group for e in await likes.pending(s, 0, 1000)]
        assert len(left) == second  # the first round's rows went with the second's read
        assert await relay.step() == 0
        assert [await likes.pending(s, 0, 1000) for s in group] == [[]] * len(group)
        assert all(c.trimmed_through == c.published_through for c in relay.sources.values())
    finally:
        await log.close()


async def test_a_round_publishes_one_message_per_partition_for_every_source_of_a_database(
        likes: PostgresLikeStore, nats_url: str) -> None:
    log = EventLog(nats_url, "T_GROUP", 3)
    await log.start()
    try:
        group = likes.source_groups()[0]
        ops = toggles(400)
        for start in range(0, len(ops), 4):  # a random slot per transaction: until two have rows
            await likes.write(ops[start:start + 4])
            before = {s: await likes.pending(s, 0, 1000) for s in group}
            if sum(1 for rows in before.values() if rows) >= 2:
                break
        assert sum(1 for rows in before.values() if rows) >= 2
        relay = GroupRelay(group, likes, log)
        moved = await relay.step()
        assert moved == sum(len(rows) for rows in before.values())
        assert log.published_msgs <= 3  # one per partition, whatever the number of slots
        assert [await likes.pending(s, 0, 1000) for s in group] == [[]] * len(group)
        assert all(relay.sources[s].published_through == rows[-1].seq
                   for s, rows in before.items() if rows)
        got = [(e.source, e.seq) for p in range(3) for e in await _read(log, p)]
        assert sorted(got) == sorted((e.source, e.seq) for rows in before.values() for e in rows)
    finally:
        await log.close()


async def _read(log: EventLog, partition: int) -> list[Event]:
    reader = await log.reader(partition, 0)
    try:
        out: list[Event] = []
        while msgs := await reader.fetch(100, 0.3):
            out.extend(ev for m in msgs for ev in m.events)
        return out
    finally:
        await reader.close()
