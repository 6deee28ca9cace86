"""The SQLite adapter: exact write answers, exactly-once application, restart, reconcile."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from tally.core.coalesce import coalesce
from tally.core.model import IncrOp
from tally.store.sqlite.schema import MMAP_BYTES, connect
from tally.store.sqlite.store import SqliteStore
from tally.workers.aggregator import Aggregator
from tests.helpers import db_rows, like, recount, stored, writer_held

pytestmark = pytest.mark.anyio

ITEM = "post:1"


async def test_concurrent_likes_answer_exact_counts(store: SqliteStore) -> None:
    """Jobs in one group commit see each other's changes: 20 likes answer 1..20."""
    counts: list[int] = []

    async def one(user: int) -> None:
        (res,) = await store.write([like(user, ITEM)])
        counts.append(res.count)

    async with anyio.create_task_group() as tg:
        for user in range(20):
            tg.start_soon(one, user)
    assert store.write_stats()[0] < 20  # group commits
    assert sorted(counts) == list(range(1, 21))


async def test_repeat_changes_nothing_and_logs_nothing(store: SqliteStore, db: Path) -> None:
    first = await store.write([like(1, ITEM)])
    again = await store.write([like(1, ITEM)])
    assert (first[0].changed, first[0].count, first[0].state) == (True, 1, True)
    assert (again[0].changed, again[0].count, again[0].seq) == (False, 1, None)
    assert db_rows(db, "SELECT count(*) FROM changelog")[0][0] == 1
    off = await store.write([like(1, ITEM, on=False), like(1, ITEM, on=False)])
    assert [(r.changed, r.count, r.state) for r in off] == [(True, 0, False), (False, 0, False)]
    assert await store.has("like", "1", [ITEM, "post:2"]) == [False, False]


async def test_ops_in_one_write_see_each_other(store: SqliteStore) -> None:
    res = await store.write([like(1, ITEM), like(2, ITEM), like(1, ITEM, on=False)])
    assert [r.count for r in res] == [1, 2, 1]


async def test_idempotency_key_counts_once(store: SqliteStore) -> None:
    op = IncrOp(counter="view", item=ITEM, n=3, region="local", idempotency_key="k1")
    first, again = await store.write([op]), await store.write([op])
    assert (first[0].changed, first[0].count) == (True, 3)
    assert (again[0].changed, again[0].count) == (False, 3)
    expired = IncrOp(counter="view", item=ITEM, n=2, region="local", idempotency_key="k2",
                     dedupe_window_s=-1)  # already outside its window: a repeat counts again
    await store.write([expired])
    assert (await store.write([expired]))[0].count == 7
    assert await store.purge_idempotency() == 1


async def test_stale_watermark_writes_nothing(store: SqliteStore, db: Path) -> None:
    await store.write([like(u, ITEM) for u in range(3)])
    events = await store.read(0, 100)
    batch = coalesce(events)
    assert await store.apply_batch(batch, "agg", {"local": 0}) == {("like", ITEM): 3}
    again = await store.apply_batch(batch, "agg", {"local": 0})  # a second applier, too late
    assert again is None
    assert stored(db) == {("like", ITEM): 3}
    assert await store.watermarks("agg") == {"local": batch.positions["local"]}
    assert await store.read(0, 100) == []  # applied events are trimmed from the log
    assert (await store.write([like(9, ITEM)]))[0].count == 4  # pending did not double-count


async def test_a_like_beside_a_batch_being_applied_answers_exact_counts(
        store: SqliteStore) -> None:
    """A like answered while an aggregation is queued in the counts writer, and one after it
    committed: each count is exact, whichever side of the counts' commit it read."""
    await store.write([like(u, ITEM) for u in range(3)])
    batch = coalesce(await store.read(0, 100))
    async with anyio.create_task_group() as tg, writer_held(store.counts_writer):
        tg.start_soon(store.apply_batch, batch, "agg", {})
        await anyio.sleep(0)
        assert (await store.write([like(3, ITEM)]))[0].count == 4  # the counts still at 0
    assert await store.watermarks("agg") == {"local": batch.positions["local"]}
    assert (await store.write([like(4, ITEM)]))[0].count == 5  # the counts at 3, one logged


async def test_restart_rebuilds_pending(db: Path) -> None:
    s = SqliteStore(db)
    await s.start()
    await s.write([like(u, ITEM) for u in range(5)])
    agg = Aggregator(s, s, window_s=0.001)
    await agg.drain()
    await s.write([like(u, ITEM) for u in range(5, 8)])  # logged, not aggregated
    await s.close()

    s2 = SqliteStore(db)
    await s2.start()
    try:
        assert (await s2.write([like(8, ITEM)]))[0].count == 9
        assert (await s2.write([like(0, ITEM, on=False)]))[0].count == 8
        await Aggregator(s2, s2, window_s=0.001).drain()
        assert stored(db) == recount(db) == {("like", ITEM): 8}
    finally:
        await s2.close()


async def test_has_answers_in_order(store: SqliteStore) -> None:
    await store.write([like(1, "post:a"), like(1, "post:c"), like(2, "post:b")])
    assert await store.has("like", "1", ["post:c", "post:b", "post:a", "post:c"]) == \
        [True, False, True, True]
    assert await store.has("save", "1", ["post:a"]) == [False]


async def test_get_is_one_batch(store: SqliteStore) -> None:
    await store.write([like(1, "post:a"), like(1, "post:b", counter="save")])
    await Aggregator(store, store, window_s=0.001).drain()
    got = await store.get([("like", "post:a"), ("save", "post:b"), ("like", "post:zzz")])
    assert got == {("like", "post:a"): 1, ("save", "post:b"): 1}
    assert await store.get([]) == {}


async def test_every_connection_reads_through_the_memory_map(db: Path) -> None:
    s = SqliteStore(db)
    await s.start()
    try:
        await s.write([like(1, ITEM)])
        sizes = [s._reader().execute(f"PRAGMA {schema}.mmap_size").fetchone()[0]
                 for schema in ("main", "likes")]  # readers open the counts, see every shard
        sizes += await s.counts_writer.run(lambda c, tx: [c.execute(f"PRAGMA {schema}.mmap_size")
                                                          .fetchone()[0] for schema in ("main", "likes")])
        likes = connect(db, "FULL", writes="likes")  # as the likes writer opens it
        try:
            sizes += [likes.execute(f"PRAGMA {schema}.mmap_size").fetchone()[0]
                      for schema in ("main", "counts")]
        finally:
            likes.close()
        assert sizes == [MMAP_BYTES] * 6
        assert await s.has("like", "1", [ITEM, "post:2"]) == [True, False]
    finally:
        await s.close()
