"""Outbox contract: one row per real change, numbered per source in commit order, trimmed on demand."""

from __future__ import annotations

import asyncio

import pytest

from tally.core.model import Event, IncrOp, ToggleOp
from tests.store.harness import Harness

pytestmark = pytest.mark.anyio


def like(user: str, item: str = "post:1", on: bool = True) -> ToggleOp:
    return ToggleOp(counter="like", item=item, user=user, on=on, region="eu")


async def all_pending(h: Harness) -> list[Event]:
    return [ev for src in h.outbox.sources() for ev in await h.outbox.pending(src, 0, 100_000)]


async def test_each_real_change_has_one_row(harness: Harness) -> None:
    harness.need("likes", "outbox")
    res = await harness.likes.write([like("u1"), like("u1"), like("u2", on=False),
                                     IncrOp(counter="view", item="reel:1", n=3, region="us",
                                            idempotency_key="k", user="u7")])
    rows = await all_pending(harness)
    assert sorted((e.counter, e.item, e.user, e.delta, e.region) for e in rows) == [
        ("like", "post:1", "u1", 1, "eu"), ("view", "reel:1", "u7", 3, "us")]
    by_seq = {(e.source, e.seq) for e in rows}
    assert len(by_seq) == 2
    assert all(e.source in harness.outbox.sources() for e in rows)
    assert sorted(r.seq or 0 for r in res if r.changed) == sorted(e.seq for e in rows)


async def test_several_sources_are_read_and_trimmed_in_one_call(harness: Harness) -> None:
    harness.need("likes", "outbox")
    for i in range(40):
        await harness.likes.write([like(f"u{i}", item=f"post:{i % 5}")])
    for group in harness.outbox.source_groups():
        each = {src: await harness.outbox.pending(src, 1, 3) for src in group}
        assert await harness.outbox.pending_many(dict.fromkeys(group, 1), 3) == {
            src: rows for src, rows in each.items() if rows}
        heads = {src: await harness.outbox.outbox_head(src) for src in group}
        rows = {src: await harness.outbox.pending(src, 0, 1000) for src in group}
        through = {src: head // 2 for src, head in heads.items()}
        assert await harness.outbox.trim_many(through) == sum(through.values())
        for src in group:
            assert await harness.outbox.pending(src, 0, 1000) == [
                e for e in rows[src] if e.seq > through[src]]
    assert sorted(s for g in harness.outbox.source_groups() for s in g) == sorted(
        harness.outbox.sources())


async def test_a_read_may_trim_what_lies_at_or_below_its_positions(harness: Harness) -> None:
    """The relay's round: the rows it published last time go in the read of the next ones."""
    harness.need("likes", "outbox")
    for i in range(40):
        await harness.likes.write([like(f"u{i}", item=f"post:{i % 5}")])
    for group in harness.outbox.source_groups():
        rows = {src: await harness.outbox.pending(src, 0, 1000) for src in group}
        at = {src: len(found) // 2 for src, found in rows.items()}
        expected = {src: [e for e in found if e.seq > at[src]][:3] for src, found in rows.items()}
        assert await harness.outbox.pending_many(at, 3, trim=True) == {
            src: got for src, got in expected.items() if got}
        for src in group:
            assert await harness.outbox.pending(src, 0, 1000) == [
                e for e in rows[src] if e.seq > at[src]]


async def test_numbers_are_contiguous_and_never_reused_after_trim(harness: Harness) -> None:
    harness.need("likes", "outbox")
    for i in range(30):
        await harness.likes.write([like(f"u{i}")])
    for src in harness.outbox.sources():
        rows = await harness.outbox.pending(src, 0, 1000)
        head = await harness.outbox.outbox_head(src)
        assert [e.seq for e in rows] == list(range(1, head + 1))
        if head:
            assert [e.seq for e in await harness.outbox.pending(src, 1, 2)] == list(
                range(2, min(head, 3) + 1))
            assert await harness.outbox.trim(src, head) == head
            assert await harness.outbox.pending(src, 0, 1000) == []
            assert await harness.outbox.outbox_head(src) == head
    await harness.reopen()
    for i in range(30):
        await harness.likes.write([like(f"v{i}")])
    for src in harness.outbox.sources():
        rows = await harness.outbox.pending(src, 0, 1000)
        assert all(e.seq > 0 for e in rows)
        heads = await harness.outbox.outbox_head(src)
        assert [e.seq for e in rows] == list(range(heads - len(rows) + 1, heads + 1))
    assert len(await all_pending(harness)) == 30


async def test_a_poller_never_misses_a_row_that_commits_late(harness: Harness) -> None:
    """Concurrent writers while a relay-like poller reads ``seq > position`` per source."""
    harness.need("likes", "outbox")
    seen: list[Event] = []
    positions = dict.fromkeys(harness.outbox.sources(), 0)
    done = asyncio.Event()

    async def poll_once() -> None:
        for src, pos in positions.items():
            rows = await harness.outbox.pending(src, pos, 500)
            if rows:
                seen.extend(rows)
                positions[src] = rows[-1].seq

    async def poller() -> None:
        while not done.is_set():
            await poll_once()
            await asyncio.sleep(0)

    async def writer(w: int) -> None:
        for n in range(12):
            await harness.likes.write([like(f"w{w}", f"post:{n}"), like(f"x{w}", f"post:{n}")])

    task = asyncio.create_task(poller())
    await asyncio.gather(*(writer(w) for w in range(16)))
    done.set()
    await task
    await poll_once()
    keys = [(e.source, e.seq) for e in seen]
    assert len(keys) == len(set(keys)) == 16 * 12 * 2
    assert {(e.user, e.item) for e in seen} == {(f"{p}{w}", f"post:{n}") for p in "wx"
                                               for w in range(16) for n in range(12)}


async def test_unknown_source_is_refused(harness: Harness) -> None:
    harness.need("outbox")
    from tally.core.errors import InvalidInput

    with pytest.raises(InvalidInput):
        await harness.outbox.pending("nowhere", 0, 10)
