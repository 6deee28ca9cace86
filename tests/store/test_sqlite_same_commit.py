"""An aggregation beside a write, or a recount in one commit with an aggregation, must not count
deltas twice: the count table moves while the write or the recount reads it."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from tally.core.coalesce import coalesce
from tally.core.model import ToggleOp
from tally.store.ports import ReconcileChunk
from tally.store.sqlite.store import SqliteStore
from tests.helpers import writer_held

pytestmark = pytest.mark.anyio


def like(user: str) -> ToggleOp:
    return ToggleOp(counter="like", item="post:1", user=user, on=True, region="local")


async def test_write_beside_aggregation(store: SqliteStore) -> None:
    await store.write([like("a"), like("b")])
    batch = coalesce(await store.read(0, 100))
    applied, (res,) = await asyncio.gather(store.apply_batch(batch, "agg", {}),
                                           store.write([like("c")]))
    assert applied == {("like", "post:1"): 2}
    assert res.count == 3


async def test_recount_in_same_commit_as_aggregation(store: SqliteStore) -> None:
    await store.write([like("a"), like("b")])
    batch = coalesce(await store.read(0, 100))
    commits = store.counts_writer.commits
    chunks: list[ReconcileChunk] = []

    async def recon() -> None:
        chunks.append(await store.reconcile_chunk(["like"], ["post:1"], None, 100, repair=True))

    async with anyio.create_task_group() as tg, writer_held(store.counts_writer):
        tg.start_soon(store.apply_batch, batch, "agg", {})
        await anyio.sleep(0)
        tg.start_soon(recon)
    assert store.counts_writer.commits == commits + 2  # the holding job, then both together
    assert chunks[0].drifts == []
    assert await store.get([("like", "post:1")]) == {("like", "post:1"): 2}
