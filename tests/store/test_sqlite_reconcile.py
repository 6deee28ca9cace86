"""Reconcile on SQLite: injected drift is found in chunks and repaired, with writes in flight."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from tally.store.ports import Drift, ReconcileChunk
from tally.store.sqlite.store import SqliteStore
from tally.workers.aggregator import Aggregator
from tests.helpers import db_exec, like, recount, stored, writer_held

pytestmark = pytest.mark.anyio

ITEMS = [f"post:{i:02d}" for i in range(10)]


async def seed(store: SqliteStore) -> Aggregator:
    """Item i has i likes (and one save on each), all aggregated."""
    await store.write([like(u, item) for i, item in enumerate(ITEMS) for u in range(i)])
    await store.write([like(1, item, counter="save") for item in ITEMS])
    agg = Aggregator(store, store, window_s=0.001)
    await agg.drain()
    return agg


async def reconcile_all(store: SqliteStore, limit: int, repair: bool = True,
                        items: list[str] | None = None) -> tuple[list[Drift], int, int]:
    """All chunks; returns the drifts, the keys checked and the number of chunks."""
    drifts: list[Drift] = []
    after: tuple[str, str] | None = None
    checked = chunks = 0
    while True:
        part = await store.reconcile_chunk(["like", "save"], items, after, limit, repair)
        drifts += part.drifts
        checked += part.checked
        chunks += 1
        if part.next_after is None:
            return drifts, checked, chunks
        assert part.next_after > (after or ("", ""))  # always moves forward
        after = part.next_after


async def test_no_drift_on_a_healthy_store(store: SqliteStore) -> None:
    await seed(store)
    drifts, checked, chunks = await reconcile_all(store, limit=3)
    assert drifts == []
    assert checked == 9 + 10  # post:00 has no like (no row); every item has one save
    assert chunks > 3


async def test_injected_drift_is_found_in_chunks_and_repaired(store: SqliteStore,
                                                             db: Path) -> None:
    agg = await seed(store)
    truth = recount(db)
    db_exec(db, "UPDATE counts SET count = count + 5 WHERE item='post:03' AND counter='like'")
    db_exec(db, "DELETE FROM counts WHERE item='post:07' AND counter='like'")
    db_exec(db, "UPDATE counts SET count = -2 WHERE item='post:09' AND counter='save'")
    # A count whose toggles are all gone: only the counts table knows the item.
    db_exec(db, "INSERT INTO counts (item, counter, count) VALUES ('post:99', 'like', 4)")
    drifts, _, chunks = await reconcile_all(store, limit=2)
    assert chunks > 5
    assert {(d.counter, d.item, d.stored, d.actual) for d in drifts} == {
        ("like", "post:03", 8, 3), ("like", "post:07", 0, 7), ("save", "post:09", -2, 1),
        ("like", "post:99", 4, 0)}
    assert stored(db) == truth
    assert (await reconcile_all(store, limit=2))[0] == []
    await store.write([like(100, "post:03")])
    await agg.drain()
    assert stored(db) == recount(db)


async def test_dry_run_changes_nothing(store: SqliteStore, db: Path) -> None:
    await seed(store)
    db_exec(db, "UPDATE counts SET count = 50 WHERE item='post:05' AND counter='like'")
    before = stored(db)
    drifts, _, _ = await reconcile_all(store, limit=1000, repair=False)
    assert [(d.item, d.stored, d.actual) for d in drifts] == [("post:05", 50, 5)]
    assert stored(db) == before


async def test_unapplied_deltas_are_not_drift(store: SqliteStore, db: Path) -> None:
    agg = await seed(store)
    await store.write([like(50, "post:02"), like(0, "post:02", on=False), like(50, "post:new")])
    db_exec(db, "UPDATE counts SET count = 0 WHERE item='post:04' AND counter='like'")
    drifts, _, _ = await reconcile_all(store, limit=4)
    assert [(d.item, d.stored, d.actual) for d in drifts] == [("post:04", 0, 4)]
    await agg.drain()  # the log is applied on top of the repaired table
    assert stored(db) == recount(db)


async def test_explicit_items(store: SqliteStore, db: Path) -> None:
    await seed(store)
    db_exec(db, "UPDATE counts SET count = 1 WHERE item IN ('post:06', 'post:08') "
                "AND counter='like'")
    drifts, checked, chunks = await reconcile_all(store, limit=1, items=["post:06", "post:nope"])
    assert (checked, chunks) == (4, 1)
    assert [(d.counter, d.item) for d in drifts] == [("like", "post:06")]
    assert stored(db)[("like", "post:08")] == 1  # not named, not touched


async def test_reconcile_queued_while_a_like_commits(store: SqliteStore, db: Path) -> None:
    """A recount queued in the counts writer while a like commits in the likes writer counts
    that like once: in the records and in the log after the watermark, not twice."""
    agg = await seed(store)
    parts: list[ReconcileChunk] = []

    async def recon() -> None:
        parts.append(await store.reconcile_chunk(["like"], None, None, 1000, True))

    async with anyio.create_task_group() as tg, writer_held(store.counts_writer):
        tg.start_soon(recon)
        await anyio.sleep(0)
        await store.write([like(77, "post:05")])
    assert parts[0].drifts == []
    await agg.drain()
    assert stored(db) == recount(db)
