"""Aggregation inside SQLite: the counts and rollups of ``coalesce``, exactly once, exact answers."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.core.coalesce import coalesce
from tally.core.model import Event
from tally.store.sqlite import store as sqlite_module
from tally.store.sqlite.aggregate import apply_range, log_range
from tally.store.sqlite.ops import SOURCE
from tally.store.sqlite.schema import connect, migrate
from tally.store.sqlite.store import SqliteStore
from tests.helpers import db_rows, like, recount, stored

MIDNIGHT = 20_000 * 86_400.0
# Timestamps anywhere, and next to midnight, where a rounding difference would split a day.
TIMESTAMPS = st.one_of(st.floats(0, 4e9), st.sampled_from(
    [MIDNIGHT, MIDNIGHT - 1e-6, MIDNIGHT + 1e-6, MIDNIGHT - 0.5, 86_399.999_999_9, 0.0]))
EVENTS = st.lists(st.tuples(st.sampled_from(["like", "view"]),
                            st.sampled_from(["post:1", "post:2", "reel:a:b", "story:x", "odd"]),
                            st.sampled_from([-1, 1, 7]), TIMESTAMPS,
                            st.sampled_from(["eu", "us"])), min_size=1, max_size=40)


@settings(max_examples=150)
@given(events=EVENTS, rollups=st.sampled_from([("day", "region"), ("day",), ("region",), ()]))
def test_in_place_sums_match_coalesce(tmp_path_factory: pytest.TempPathFactory,
                                      events: list[tuple[str, str, int, float, str]],
                                      rollups: tuple[str, ...]) -> None:
    conn = connect(tmp_path_factory.mktemp("agg") / "t.db", "OFF")
    migrate(conn)
    conn.executemany("INSERT INTO changelog (counter, item, user, delta, ts, region) "
                     "VALUES (?, ?, 'u', ?, ?, ?)", [(c, i, d, ts, r) for c, i, d, ts, r in events])
    expected = coalesce([Event(n, c, i, "u", d, ts, r, SOURCE)
                         for n, (c, i, d, ts, r) in enumerate(events, 1)], rollups)

    count, upto, oldest = log_range(conn, 0, 1000, "main")
    assert (count, upto, oldest) == (len(events), len(events), expected.oldest_ts)
    new = apply_range(conn, 0, upto, rollups, "main")

    assert new == expected.deltas  # from zero, the new counts are the deltas
    assert dict(((c, i), n) for c, i, n in conn.execute("SELECT * FROM counts")) == expected.deltas
    assert {(c, t, dim, b): v for c, t, dim, b, v in conn.execute("SELECT * FROM rollups")} == \
        expected.rollups
    conn.close()


def test_a_range_stops_at_its_limit(tmp_path: Path) -> None:
    conn = connect(tmp_path / "t.db", "OFF")
    migrate(conn)
    conn.executemany("INSERT INTO changelog (counter, item, user, delta, ts, region) VALUES "
                     "('like', 'post:1', 'u', 1, ?, 'eu')", [(float(n),) for n in range(10)])
    assert log_range(conn, 0, 4, "main") == (4, 4, 0.0)
    assert log_range(conn, 4, 100, "main") == (6, 10, 4.0)
    assert log_range(conn, 10, 100, "main") == (0, 10, None)


@pytest.mark.anyio
async def test_rounds_apply_exactly_once_and_answers_stay_exact(store: SqliteStore,
                                                                db: Path) -> None:
    """A round smaller than the log leaves the rest pending; write answers stay exact throughout;
    a round that takes the whole log leaves nothing pending; the log is trimmed as it goes."""
    await store.write([like(u, "post:1") for u in range(6)] + [like(1, "post:2")])
    first = await store.aggregate("aggregator", 4, ("day", "region"))
    assert (first.events, first.position, first.counts) == (4, 4, {("like", "post:1"): 4})
    assert stored(db) == {("like", "post:1"): 4}
    (res,) = await store.write([like(9, "post:1")])
    assert res.count == 7  # the table's 4, the 2 logged after its watermark, this one

    rest = await store.aggregate("aggregator", 100, ("day", "region"))
    assert (rest.events, rest.position) == (4, 8)
    assert rest.counts == {("like", "post:1"): 7, ("like", "post:2"): 1}
    assert stored(db) == recount(db)
    assert db_rows(db, "SELECT count(*) FROM changelog") == [(0,)]
    assert await store.watermarks("aggregator") == {SOURCE: 8}
    assert (await store.aggregate("aggregator", 100, ("day",))).events == 0
    assert await store.rollups("like", "post", "region") == {"local": 8}
    (res,) = await store.write([like(10, "post:1")])
    assert res.count == 8  # nothing logged is left to add twice


@pytest.mark.anyio
async def test_a_failed_round_changes_nothing(store: SqliteStore, db: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    await store.write([like(u, "post:1") for u in range(3)])

    def broken(*args: object) -> dict[object, int]:
        raise sqlite3.OperationalError("disk I/O error")

    for limit in (2, 100):  # part of the log, and all of it
        monkeypatch.setattr(sqlite_module, "apply_range", broken)
        with pytest.raises(Exception, match="disk I/O error"):
            await store.aggregate("aggregator", limit, ("day",))
        assert stored(db) == {} and await store.watermarks("aggregator") == {}
        assert (await store.write([like(0, "post:1")]))[0].count == 3  # a repeat: still 3
        monkeypatch.undo()
    (res,) = await store.write([like(7, "post:1")])
    assert res.count == 4
    assert (await store.aggregate("aggregator", 100, ())).events == 4
    assert stored(db) == recount(db) == {("like", "post:1"): 4}


@pytest.mark.anyio
async def test_a_round_interrupted_before_its_trim_is_trimmed_by_the_next(
        store: SqliteStore, db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop or crash between a round's commit and its trim leaves applied events in the log;
    the next round, even with nothing new to apply, trims through the watermark."""
    await store.write([like(u, "post:1") for u in range(3)])
    writer = store.writer_processes[0]

    async def interrupted(through_seq: int) -> None:
        raise RuntimeError("stopped before the trim")

    monkeypatch.setattr(writer, "trim", interrupted)
    with pytest.raises(RuntimeError, match="before the trim"):
        await store.aggregate("aggregator", 100, ())
    monkeypatch.undo()
    assert db_rows(db, "SELECT count(*) FROM changelog")[0][0] == 3
    assert (await store.aggregate("aggregator", 100, ())).events == 0
    assert db_rows(db, "SELECT count(*) FROM changelog")[0][0] == 0
    assert stored(db) == recount(db) == {("like", "post:1"): 3}
