"""Recounter contract: recount = toggle records; unapplied changes are not drift; repair fixes."""

from __future__ import annotations

import pytest

from tally.core.model import ToggleOp
from tally.store.ports import ReconcileChunk
from tests.store.harness import Harness

pytestmark = pytest.mark.anyio


def like(user: str, item: str, on: bool = True) -> ToggleOp:
    return ToggleOp(counter="like", item=item, user=user, on=on, region="eu")


async def scan_all(h: Harness, repair: bool = False, limit: int = 7) -> list[ReconcileChunk]:
    chunks, after = [], None
    for _ in range(100):
        chunk = await h.recounter.reconcile_chunk(["like", "save"], None, after, limit, repair)
        chunks.append(chunk)
        if chunk.next_after is None:
            return chunks
        after = chunk.next_after
    raise AssertionError("scan did not finish")


async def test_no_drift_when_applied_or_still_in_flight(harness: Harness) -> None:
    harness.need("likes", "counts", "recounter")
    await harness.likes.write([like(f"u{u}", f"post:{i}") for u in range(6) for i in range(4)])
    await harness.pump()
    await harness.likes.write([like("u0", "post:0", on=False), like("late", "post:3")])
    # Not applied yet: the unapplied changes are part of what the store sees, not drift.
    chunks = await scan_all(harness)
    assert sum(c.checked for c in chunks) == 4
    assert [d for c in chunks for d in c.drifts] == []


async def test_drift_is_reported_and_repaired(harness: Harness) -> None:
    harness.need("likes", "counts", "recounter")
    await harness.likes.write([like(f"u{u}", f"post:{i}") for u in range(5) for i in range(20)])
    await harness.pump()
    await harness.corrupt(("like", "post:3"), 99)
    await harness.corrupt(("like", "post:17"), 0)
    await harness.corrupt(("like", "post:ghost"), 4)  # a count with no toggles at all
    chunks = await scan_all(harness, repair=True)
    assert sum(c.checked for c in chunks) == 21
    drifts = {(d.item, d.stored, d.actual) for c in chunks for d in c.drifts}
    assert drifts == {("post:3", 99, 5), ("post:17", 0, 5), ("post:ghost", 4, 0)}
    assert [d for c in await scan_all(harness) for d in c.drifts] == []
    got = await harness.counts.get([("like", "post:3"), ("like", "post:17"), ("like", "post:ghost")])
    assert got == {("like", "post:3"): 5, ("like", "post:17"): 5, ("like", "post:ghost"): 0}


async def test_repair_keeps_unapplied_changes_on_top(harness: Harness) -> None:
    harness.need("likes", "counts", "recounter")
    await harness.likes.write([like(f"u{u}", "post:1") for u in range(4)])
    await harness.pump()
    await harness.corrupt(("like", "post:1"), 40)
    await harness.likes.write([like("u9", "post:1")])  # logged, not yet applied
    chunk = await harness.recounter.reconcile_chunk(["like"], ["post:1"], None, 10, True)
    assert [(d.stored, d.actual) for d in chunk.drifts] == [(41, 5)]
    await harness.pump()
    assert await harness.counts.get([("like", "post:1")]) == {("like", "post:1"): 5}


async def test_explicit_items_check_only_those(harness: Harness) -> None:
    harness.need("likes", "counts", "recounter")
    await harness.likes.write([like("u1", "post:1"), like("u1", "post:2")])
    await harness.pump()
    await harness.corrupt(("like", "post:2"), 7)
    chunk = await harness.recounter.reconcile_chunk(["like"], ["post:1", "post:3"], None, 10, False)
    assert (chunk.checked, chunk.drifts, chunk.next_after) == (2, [], None)
    chunk = await harness.recounter.reconcile_chunk(["like"], ["post:2"], None, 10, False)
    assert [(d.item, d.stored, d.actual) for d in chunk.drifts] == [("post:2", 7, 1)]
    assert await harness.counts.get([("like", "post:2")]) == {("like", "post:2"): 7}
