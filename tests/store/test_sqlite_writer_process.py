"""The likes writer in a child process: exact answers without shared memory, and a child that dies.

The contract suites run against it too (the ``sqlite`` and ``sqlite-shards`` harnesses); these
tests cover the child's own account of unapplied deltas, its restart, and the shard files.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tally.core.errors import ConfigError, Unavailable
from tally.store.sqlite.pending import LoggedSince
from tally.store.sqlite.store import SqliteStore
from tally.store.sqlite.writer_process import WRITES_IN_FLIGHT
from tests.helpers import like, poll, recount

K, L = ("like", "post:1"), ("like", "post:2")


def test_logged_since_keeps_the_events_after_a_watermark() -> None:
    logged = LoggedSince([(1, K, 1), (2, L, 1), (3, K, 1)])
    assert logged.since([K, L], 0) == {K: 2, L: 1}
    assert logged.since([K, L], 2) == {K: 1}  # events 1 and 2 are in the counts now
    assert logged.since([K, L], 1) == {K: 1}  # a watermark never goes back: they stay gone
    assert len(logged) == 1


def test_logged_since_nets_a_like_and_its_unlike_to_nothing() -> None:
    logged = LoggedSince([(1, K, 1), (2, K, -1)])
    assert logged.since([K], 0) == {}
    assert logged.since([K], 1) == {K: -1}  # the like is counted, the unlike not yet
    assert logged.since([K], 2) == {}


def test_logged_since_forgets_events_rolled_back() -> None:
    logged = LoggedSince([(1, K, 1)])
    logged.add([(2, K, 1), (3, L, 1)])
    logged.drop_after(1)
    assert logged.since([K, L], 0) == {K: 1} and len(logged) == 1


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "tally.db")
    await s.start()
    try:
        yield s
    finally:
        await s.close()


@pytest.mark.anyio
async def test_answers_stay_exact_across_aggregation_rounds(store: SqliteStore) -> None:
    for n in range(1, 61):
        (result,) = await store.write([like(n, "post:1")])
        assert result.changed and result.count == n
        if n % 7 == 0:
            await store.aggregate("agg", 1_000, ["day"])
    (result,) = await store.write([like(3, "post:1", on=False)])
    assert result.count == 59
    await store.aggregate("agg", 1_000, ["day"])
    assert await store.get([K]) == {K: 59} == recount(store.path)


@pytest.mark.anyio
async def test_a_killed_writer_fails_writes_in_flight_and_comes_back(store: SqliteStore) -> None:
    (proc,) = store.writer_processes
    assert proc.pid is not None
    first = await store.write([like(n, "post:1") for n in range(50)])
    assert first[-1].count == 50
    os.kill(proc.pid, signal.SIGKILL)

    async def refused_then_served() -> bool:
        try:
            await store.write([like("late", "post:2")])
        except Unavailable:
            return False
        return True

    await poll(refused_then_served, timeout_s=30)
    assert proc.restarts == 1
    # Every acknowledged like survived the kill; the child that replaced it answers exactly.
    (again,) = await store.write([like(7, "post:1")])
    assert not again.changed and again.count == 50
    (new,) = await store.write([like(50, "post:1")])
    assert new.changed and new.count == 51
    await store.aggregate("agg", 1_000, [])
    assert await store.get([K, L]) == {K: 51, L: 1}
    assert store.write_stats()[1] >= 52  # committed operations, counted across both children


@pytest.mark.anyio
async def test_writes_held_behind_those_in_flight_go_together_and_answer_exactly(
        store: SqliteStore) -> None:
    (proc,) = store.writer_processes
    # Each call below is its own event-loop turn's write: the first WRITES_IN_FLIGHT go out at
    # once, the rest wait for an answer and then go as one message.
    futures = [proc.write([like(n, "post:1")]) for n in range(8)]
    assert proc._writes == WRITES_IN_FLIGHT and len(proc._held.waiters) == 8 - WRITES_IN_FLIGHT
    results = [(await f)[0] for f in futures]
    assert [r.count for r in results] == list(range(1, 9)) and all(r.changed for r in results)
    assert proc._writes == 0 and not proc._held.waiters


@pytest.mark.anyio
async def test_held_writes_fail_with_the_writer_and_later_ones_are_served(
        store: SqliteStore) -> None:
    (proc,) = store.writer_processes
    assert proc.pid is not None
    futures = [proc.write([like(n, "post:1")]) for n in range(6)]
    os.kill(proc.pid, signal.SIGKILL)
    outcomes = [await asyncio.gather(f, return_exceptions=True) for f in futures]
    # A write already sent may have committed before the kill; a held one never left.
    assert all(isinstance(o[0], Unavailable) for o in outcomes[WRITES_IN_FLIGHT:])
    assert proc._writes == 0 and not proc._held.waiters

    async def served() -> bool:
        try:
            await store.write([like("late", "post:2")])
        except Unavailable:
            return False
        return True

    await poll(served, timeout_s=30)


@pytest.mark.anyio
async def test_likes_spread_over_shard_files_and_count_once(tmp_path: Path) -> None:
    db = tmp_path / "tally.db"
    s = SqliteStore(db, likes_shards=3)
    await s.start()
    try:
        results = await s.write([like(u, "post:1") for u in range(90)] + [like(5, "post:2")])
        assert all(r.changed for r in results)
        # Each answer holds its own like and those before it in its shard; never more.
        assert all(1 <= r.count <= n for n, r in enumerate(results[:90], 1))
        assert results[-1].count == 1
        assert await s.has("like", "5", ["post:1", "post:2", "post:3"]) == [True, True, False]
        assert await s.has("like", "90", ["post:1"]) == [False]
        await s.aggregate("agg", 1_000, ["day"])
        assert await s.get([K, L]) == {K: 90, L: 1}
        assert (await s.lag("agg"))[:2] == (91, 91)
        (again,) = await s.write([like(7, "post:1")])
        assert not again.changed and again.count == 90  # the table now holds every shard
    finally:
        await s.close()
    per_shard = [recount(p).get(K, 0) for p in
                 (db, tmp_path / "tally-likes1.db", tmp_path / "tally-likes2.db")]
    assert sum(per_shard) == 90 and all(n > 0 for n in per_shard)


@pytest.mark.anyio
async def test_the_number_of_shards_stays_what_the_data_was_split_into(tmp_path: Path) -> None:
    db = tmp_path / "tally.db"
    one = SqliteStore(db)
    await one.start()
    await one.write([like(1, "post:1")])
    await one.close()
    two = SqliteStore(db, likes_shards=2)
    with pytest.raises(ConfigError, match="split over 1 shard"):
        await two.start()
    await two.close()
    with pytest.raises(ConfigError, match="at least 1"):
        SqliteStore(db, likes_shards=0)


@pytest.mark.anyio
async def test_a_prefetched_count_older_than_a_round_is_read_again(tmp_path: Path) -> None:
    """The child reads a round's counts before it runs the round's jobs. If an aggregation round
    moved the watermark past that read before a job ran (and the child's log account dropped the
    events in between), the read is stale and must be done again; otherwise it serves."""
    from tally.store.sqlite.writer_process import WriterConfig, _Child

    s = SqliteStore(tmp_path / "tally.db")  # its own writer process writes the shared files
    await s.start()
    child = _Child(WriterConfig(s.path))  # this one only reads: it is never started
    try:
        await s.write([like(u, "post:1") for u in (1, 2, 3)])
        await s.aggregate("agg", 1_000, [])
        early = child.prefetch([like(4, "post:1")])
        assert (early.position, early.stored) == (3, {K: 3})
        await s.write([like(4, "post:1"), like(5, "post:1")])
        child.logged.add([(4, K, 1), (5, K, 1)])  # as if the child had logged them
        assert child._exact_counts([K], early) == {K: 5}  # table at 3 + events 4 and 5
        await s.aggregate("agg", 1_000, [])
        assert child._exact_counts([K]) == {K: 5}  # a later batch's read: table at 5, events gone
        assert child.logged.position == 5 and len(child.logged) == 0
        assert child._exact_counts([K], early) == {K: 5}  # the prefetch (at 3) is read again
        assert child._exact_counts([L], early) == {}  # and so is one for other keys
    finally:
        if child._reader is not None:
            child._reader.close()
        await s.close()
