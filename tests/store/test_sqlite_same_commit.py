"""An aggregation job and a write (or a recount) in one group commit must not count deltas twice.

Inside the shared transaction the count table already holds the aggregated deltas while the
writer's pending map still holds them until the commit; reads in later jobs must subtract them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tally.core.coalesce import coalesce
from tally.core.model import ToggleOp
from tally.store.sqlite.store import SqliteStore

pytestmark = pytest.mark.anyio


def like(user: str) -> ToggleOp:
    return ToggleOp(counter="like", item="post:1", user=user, on=True, region="local")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "t.db", group_commit_ms=200.0)  # a wide window: jobs share commits
    await s.start()
    try:
        yield s
    finally:
        await s.close()


async def test_write_in_same_commit_as_aggregation(store: SqliteStore) -> None:
    await store.write([like("a"), like("b")])
    batch = coalesce(await store.read(0, 100))
    applied, (res,) = await asyncio.gather(store.apply_batch(batch, "agg", {}),
                                           store.write([like("c")]))
    assert applied == {("like", "post:1"): 2}
    assert store.writer.commits == 2  # both jobs went into the second commit
    assert res.count == 3


async def test_recount_in_same_commit_as_aggregation(store: SqliteStore) -> None:
    await store.write([like("a"), like("b")])
    batch = coalesce(await store.read(0, 100))
    _applied, chunk = await asyncio.gather(
        store.apply_batch(batch, "agg", {}),
        store.reconcile_chunk(["like"], ["post:1"], None, 100, repair=True))
    assert chunk.drifts == []
    assert await store.get([("like", "post:1")]) == {("like", "post:1"): 2}
