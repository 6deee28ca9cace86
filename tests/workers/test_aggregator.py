"""The aggregator: exactly once under redelivery and competition, drains on stop, stops promptly."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from tally.bootstrap import build
from tally.core.model import Event
from tally.settings import Settings
from tally.store.sqlite.store import SqliteStore
from tally.workers.aggregator import Aggregator
from tests.helpers import db_rows, like, poll, recount, stored

pytestmark = pytest.mark.anyio


class RedeliveringLog:
    """A change log that hands every event out twice, as an at-least-once broker may."""

    def __init__(self, inner: SqliteStore) -> None:
        self.inner = inner
        self.source = inner.source
        self.seen: list[Event] = []

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def read(self, after_seq: int, limit: int) -> list[Event]:
        fresh = await self.inner.read(after_seq, limit)
        out = self.seen[-limit:] + fresh  # old events again, then the new ones
        self.seen += fresh
        return out

    async def head(self) -> int:
        return await self.inner.head()


async def test_redelivered_events_apply_once(store: SqliteStore, db: Path) -> None:
    agg = Aggregator(RedeliveringLog(store), store, window_s=0.001, max_events=7)
    for round_ in range(5):
        await store.write([like(u, f"post:{u % 3}") for u in range(round_ * 10, round_ * 10 + 10)])
        await store.write([like(round_ * 10, "post:0", on=False)])
        await agg.drain()
    assert stored(db) == recount(db)
    assert agg.stats.events == 52  # 50 likes, and the two unlikes that found a like (rounds 0, 3)


async def test_competing_aggregators_apply_once(store: SqliteStore, db: Path) -> None:
    one, two = (Aggregator(store, store, window_s=0.001, max_events=5) for _ in range(2))
    await store.write([like(u, f"post:{u % 4}") for u in range(200)])
    async with anyio.create_task_group() as tg:
        tg.start_soon(one.drain)
        tg.start_soon(two.drain)
    assert one.stats.events + two.stats.events == 200
    assert stored(db) == recount(db) == {("like", f"post:{i}"): 50 for i in range(4)}


async def test_coalesces_a_hot_item_into_one_row_write(store: SqliteStore, db: Path) -> None:
    applied: list[dict[tuple[str, str], int]] = []
    agg = Aggregator(store, store, window_s=0.001, on_applied=applied.append)
    await store.write([like(u, "post:viral") for u in range(500)])
    await store.write([like(u, "post:viral", on=False) for u in range(100)])
    await agg.drain()
    assert (agg.stats.batches, agg.stats.keys_written, agg.stats.events) == (1, 1, 600)
    assert applied == [{("like", "post:viral"): 400}]
    rollups = await store.rollups("like", "post", "region")
    assert rollups == {"local": 400}


async def test_runs_in_the_background_and_reports_lag(store: SqliteStore, db: Path) -> None:
    agg = Aggregator(store, store, window_s=0.005)
    agg.start()
    try:
        await store.write([like(1, "post:1")])
        agg.notify()

        async def applied() -> bool:
            return stored(db) == {("like", "post:1"): 1}

        async def caught_up() -> bool:
            # The lag is read through the store's read connections, whose snapshot may begin
            # just before the commit this test saw through its own: polled, not read once.
            await agg.refresh_lag()
            return agg.stats.lag_seconds == 0.0

        await poll(applied)
        await poll(caught_up)
        assert agg.stats.head == 1
    finally:
        with anyio.fail_after(10):
            await agg.stop()


async def test_stop_drains_what_is_logged(store: SqliteStore, db: Path) -> None:
    agg = Aggregator(store, store, window_s=10.0)  # a long window: only stop() applies
    agg.start()
    await store.write([like(u, "post:1") for u in range(3)])
    agg.notify()
    with anyio.fail_after(10):
        await agg.stop()
    assert stored(db) == {("like", "post:1"): 3}
    assert db_rows(db, "SELECT count(*) FROM changelog")[0][0] == 0


async def test_stop_right_after_a_write_returns(settings: Settings) -> None:
    """A cancel that arrives as the wake-up fires must still stop the aggregator task."""
    for round_ in range(5):
        rt = build(settings)
        await rt.start()
        op = rt.service.toggle_op("like", "post", 1, round_, True)
        await rt.service.write([op])
        with anyio.fail_after(10):
            await rt.stop()
    assert recount(settings.sqlite_path) == {("like", "post:1"): 5}


async def test_a_large_round_is_summed_off_the_loop_with_the_same_result(
        store: SqliteStore, db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tally.workers.aggregator as aggregator_module

    monkeypatch.setattr(aggregator_module, "INLINE_EVENTS", 5)
    await store.write([like(u, f"post:{u % 3}") for u in range(40)])
    await store.write([like(u, f"post:{u % 3}", on=False) for u in range(0, 40, 4)])
    agg = Aggregator(store, store, window_s=0.001, max_events=1000)
    assert await agg.step() == 50  # one round, past the inline bound
    assert stored(db) == recount(db) == {("like", "post:0"): 10, ("like", "post:1"): 10,
                                         ("like", "post:2"): 10}
