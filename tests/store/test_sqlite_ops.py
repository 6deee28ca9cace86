"""Set-wise writes: one writer job per event-loop turn, with the answers of one-by-one execution."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tally.core.errors import Unavailable
from tally.core.model import IncrOp
from tally.store.sqlite.store import SqliteStore
from tests.helpers import db_rows, like, recount

pytestmark = pytest.mark.anyio

ITEM = "post:1"


def view(key: str | None, n: int = 1) -> IncrOp:
    return IncrOp(counter="view", item=ITEM, n=n, region="eu", idempotency_key=key)


async def test_one_batch_runs_repeats_and_reversals_in_order(store: SqliteStore, db: Path) -> None:
    ops = [like(1, ITEM), like(1, ITEM), like(1, ITEM, on=False), like(2, ITEM),
           like(1, ITEM), like(3, ITEM, on=False)]
    res = await store.write(ops)
    assert [r.changed for r in res] == [True, False, True, True, True, False]
    assert [r.count for r in res] == [1, 1, 0, 1, 2, 2]
    assert [r.state for r in res] == [True, True, False, True, True, False]
    seqs = [r.seq for r in res if r.seq is not None]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    log = db_rows(db, "SELECT seq, user, delta FROM changelog ORDER BY seq")
    assert log == [(seqs[0], "1", 1), (seqs[1], "1", -1), (seqs[2], "2", 1), (seqs[3], "1", 1)]
    assert db_rows(db, "SELECT user, state, version FROM toggles ORDER BY user") == [
        ("1", 1, 3), ("2", 1, 1)]
    assert recount(db) == {("like", ITEM): 2}


async def test_increments_keep_their_idempotency_keys_within_a_batch(store: SqliteStore) -> None:
    res = await store.write([view("k1"), view("k1"), view(None, 5), view("k2", 2)])
    assert [r.changed for r in res] == [True, False, True, True]
    assert [r.count for r in res] == [1, 1, 6, 8]
    (again,) = await store.write([view("k2", 2)])
    assert (again.changed, again.count) == (False, 8)


async def test_requests_in_one_turn_share_a_job_and_get_their_own_answers(
        store: SqliteStore) -> None:
    jobs_before = store.write_stats()[1]
    answers = await asyncio.gather(*(store.write([like(u, ITEM), like(u, "post:2")])
                                     for u in range(10)))
    assert all(len(a) == 2 for a in answers)
    assert sorted(a[0].count for a in answers) == list(range(1, 11))
    assert store.write_stats()[1] - jobs_before == 20


async def test_a_cancelled_request_does_not_cancel_the_others(store: SqliteStore) -> None:
    first = asyncio.ensure_future(store.write([like(1, ITEM)]))
    second = asyncio.ensure_future(store.write([like(2, ITEM)]))
    await asyncio.sleep(0)  # both joined the same batch
    first.cancel()
    (res,) = await second
    assert res.changed and res.count in (1, 2)


async def test_writes_after_close_fail_every_waiter(db: Path) -> None:
    s = SqliteStore(db)
    await s.start()
    await s.close()
    with pytest.raises(Unavailable):
        await s.write([like(1, ITEM)])


async def test_reads_on_the_event_loop(db: Path) -> None:
    s = SqliteStore(db)
    await s.start()
    try:
        await s.write([like(1, "post:a"), like(1, "post:c")])
        assert await s.has("like", "1", ["post:a", "post:b", "post:c"]) == [True, False, True]
        assert await s.get([("like", "post:a")]) == {}  # not aggregated yet
    finally:
        await s.close()


async def test_a_batch_of_distinct_toggles_writes_only_changes(store: SqliteStore,
                                                               db: Path) -> None:
    """The one-statement path for distinct toggles: a like of a toggle already on and an unlike
    of one never set change nothing and write no record; versions move as one by one."""
    await store.write([like(1, ITEM), like(2, ITEM), like(5, ITEM)])
    await store.write([like(2, ITEM, on=False)])
    res = await store.write([like(1, ITEM), like(2, ITEM), like(3, ITEM), like(4, ITEM, on=False),
                             like(5, ITEM, on=False)])
    assert [r.changed for r in res] == [False, True, True, False, True]
    assert [r.count for r in res] == [2, 3, 4, 4, 3]
    assert db_rows(db, "SELECT user, state, version FROM toggles ORDER BY user") == [
        ("1", 1, 1), ("2", 1, 3), ("3", 1, 1), ("5", 0, 2)]
    assert db_rows(db, "SELECT user, delta FROM changelog ORDER BY seq")[-3:] == [
        ("2", 1), ("3", 1), ("5", -1)]
    assert recount(db) == {("like", ITEM): 3}


def test_stored_counts_reads_each_counter_apart_and_leaves_absent_keys_out(tmp_path: Path) -> None:
    """The batch read behind a feed and every writer batch: several counters at once, more
    items than one statement takes, keys asked twice, and keys never counted."""
    import sqlite3

    from tally.store.sqlite.ops import _CHUNK, stored_counts

    conn = sqlite3.connect(tmp_path / "counts.db")
    conn.execute("CREATE TABLE counts (counter TEXT NOT NULL, item TEXT NOT NULL, "
                 "count INTEGER NOT NULL, PRIMARY KEY (counter, item)) WITHOUT ROWID")
    rows = [("like", f"post:{n}", n) for n in range(0, 2 * _CHUNK + 7, 2)]
    rows += [("save", f"post:{n}", 10 * n) for n in range(0, 30, 3)]
    conn.executemany("INSERT INTO counts VALUES (?, ?, ?)", rows)
    keys = [(c, f"post:{n}") for n in range(2 * _CHUNK + 7) for c in ("like", "save")]
    keys += [("like", "post:2"), ("view", "post:2")]
    assert stored_counts(conn, keys) == {(c, i): n for c, i, n in rows}
    assert stored_counts(conn, [("like", "post:1"), ("save", "post:1")]) == {}
    assert stored_counts(conn, []) == {}
