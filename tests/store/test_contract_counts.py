"""CountStore contract: deltas and watermarks move together, once, only from the expected position."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import defaultdict
from typing import Any

import pytest

from tally.core.coalesce import Batch, coalesce
from tally.core.errors import Unavailable
from tally.core.model import Event
from tests.store.harness import Harness

pytestmark = pytest.mark.anyio
NOW = time.time()


def events(source: str, first_seq: int, items: list[str], delta: int = 1,
           counter: str = "like") -> list[Event]:
    return [Event(seq=first_seq + n, counter=counter, item=item, user=f"u{n}", delta=delta,
                  ts=NOW, region="eu", source=source) for n, item in enumerate(items)]


async def apply(h: Harness, evs: list[Event], consumer: str = "c1") -> dict[tuple[str, str], int] | None:
    marks = await h.counts.watermarks(consumer)
    return await h.counts.apply_batch(coalesce(evs, applied=marks), consumer, marks)


async def test_apply_returns_absolute_counts_and_moves_watermarks(harness: Harness) -> None:
    harness.need("counts")
    items = [f"post:{i}" for i in range(40)]
    got = await apply(harness, events("a", 1, items) + events("b", 1, items[:10], delta=2))
    assert got == {("like", i): 3 if n < 10 else 1 for n, i in enumerate(items)}
    assert await harness.counts.watermarks("c1") == {"a": 40, "b": 10}
    assert await harness.counts.get([("like", "post:0"), ("like", "post:39"), ("like", "none")]) == {
        ("like", "post:0"): 3, ("like", "post:39"): 1}
    again = await apply(harness, events("a", 41, ["post:0"], delta=-1))
    assert again == {("like", "post:0"): 2}


async def test_redelivery_is_applied_once(harness: Harness) -> None:
    harness.need("counts")
    evs = events("a", 1, ["post:1", "post:2", "post:1"])
    assert await apply(harness, evs) is not None
    # The same events again (a broker redelivery) are at or below the watermark: skipped.
    marks = await harness.counts.watermarks("c1")
    batch = coalesce(evs + events("a", 4, ["post:2"]), applied=marks)
    assert (batch.skipped, batch.events) == (3, 1)
    assert await harness.counts.apply_batch(batch, "c1", marks) == {("like", "post:2"): 2}
    assert await harness.counts.get([("like", "post:1")]) == {("like", "post:1"): 2}


async def test_stale_expectation_writes_nothing(harness: Harness) -> None:
    harness.need("counts")
    first = coalesce(events("a", 1, ["post:1"]))
    assert await harness.counts.apply_batch(first, "c1", {}) is not None
    # Another process applied first: the same batch with the old expectation is refused whole.
    assert await harness.counts.apply_batch(first, "c1", {}) is None
    mixed = coalesce(events("a", 2, ["post:1"]) + events("b", 1, ["post:9"]))
    assert await harness.counts.apply_batch(mixed, "c1", {"a": 1, "b": 5}) is None
    assert await harness.counts.get([("like", "post:1"), ("like", "post:9")]) == {
        ("like", "post:1"): 1}
    assert await harness.counts.watermarks("c1") == {"a": 1}
    assert await harness.counts.rollups("like", "post", "region") == {"eu": 1}


async def test_consumers_keep_separate_watermarks(harness: Harness) -> None:
    harness.need("counts")
    assert await apply(harness, events("a", 1, ["post:1"]), "p1") is not None
    assert await apply(harness, events("a", 1, ["post:2"]), "p2") is not None
    assert await harness.counts.watermarks("p1") == {"a": 1}
    assert await harness.counts.watermarks("p2") == {"a": 1}
    assert await harness.counts.watermarks("nobody") == {}


async def test_racing_appliers_of_one_batch_apply_it_once(harness: Harness) -> None:
    harness.need("counts")
    items = [f"reel:{i}" for i in range(30)]
    batch = coalesce(events("a", 1, items))
    outcomes = await asyncio.gather(*(harness.counts.apply_batch(batch, "c1", {})
                                      for _ in range(4)))
    assert sum(o is not None for o in outcomes) == 1
    got = await harness.counts.get([("like", i) for i in items])
    assert got == {("like", i): 1 for i in items}


async def test_rollups_sum_per_bucket(harness: Harness) -> None:
    harness.need("counts")
    us = Event(seq=4, counter="like", item="post:3", user="x", delta=1, ts=NOW, region="us",
               source="a")
    evs = [*events("a", 1, ["post:1", "post:2", "reel:1"]), us]
    assert await apply(harness, evs) is not None
    assert await harness.counts.rollups("like", "post", "region") == {"eu": 2, "us": 1}
    assert await harness.counts.rollups("like", "reel", "region") == {"eu": 1}
    day = time.strftime("%Y-%m-%d", time.gmtime(NOW))
    assert await harness.counts.rollups("like", "post", "day") == {day: 3}


async def test_empty_batch_changes_nothing(harness: Harness) -> None:
    harness.need("counts")
    assert await harness.counts.apply_batch(Batch(), "c1", {}) == {}
    assert await harness.counts.watermarks("c1") == {}


async def test_restart_keeps_counts_watermarks_and_rollups(harness: Harness) -> None:
    harness.need("counts")
    assert await apply(harness, events("a", 1, [f"post:{i}" for i in range(8)])) is not None
    await harness.reopen()
    assert await harness.counts.watermarks("c1") == {"a": 8}
    assert await harness.counts.get([("like", "post:7")]) == {("like", "post:7"): 1}
    assert await harness.counts.rollups("like", "post", "region") == {"eu": 8}


async def test_random_redeliveries_and_crashes_apply_each_event_once(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """An at-least-once broker: per source in order, but rewinding at random (redelivery); on
    PostgreSQL the second step of a cross-database batch also fails at random (a crash). The
    counts end equal to every event applied exactly once."""
    harness.need("counts")
    rng = random.Random(7)
    sources = {s: [Event(seq=n + 1, counter="like", item=f"post:{rng.randrange(30)}", user="u",
                         delta=rng.choice((1, 1, -1)), ts=NOW, region="eu", source=s)
                   for n in range(150)] for s in ("a", "b", "c")}
    cursor = dict.fromkeys(sources, 0)
    if harness.name == "postgres":
        store: Any = harness.counts
        roll = store._roll_forward

        async def flaky(*args: Any) -> Any:
            if rng.random() < 0.3:
                raise Unavailable("crash between the decision and the roll-forward")
            return await roll(*args)

        monkeypatch.setattr(store, "_roll_forward", flaky)
    for _ in range(400):
        if all(c == len(sources[s]) for s, c in cursor.items()):
            break
        chunk: list[Event] = []
        for s in rng.sample(sorted(sources), rng.randint(1, 3)):
            if rng.random() < 0.3:
                cursor[s] = max(cursor[s] - rng.randint(1, 40), 0)  # redelivery
            take = sources[s][cursor[s]:cursor[s] + rng.randint(1, 25)]
            chunk += take
            cursor[s] += len(take)
        try:
            await apply(harness, chunk)
        except Unavailable:  # the broker redelivers whatever was not acknowledged
            marks = None
            for _ in range(50):  # finishing the pending intent may crash again, at random
                with contextlib.suppress(Unavailable):
                    marks = await harness.counts.watermarks("c1")
                    break
            assert marks is not None
            cursor = {s: marks.get(s, 0) for s in cursor}
    monkeypatch.undo()
    if harness.name == "postgres":
        assert store.rolled_forward > 0  # crashes happened, and their intents were finished
    assert await harness.counts.watermarks("c1") == dict.fromkeys(sources, 150)
    expected: dict[tuple[str, str], int] = defaultdict(int)
    for evs in sources.values():
        for e in evs:
            expected[(e.counter, e.item)] += e.delta
    got = await harness.counts.get(list(expected))
    assert {k: got.get(k, 0) for k in expected} == dict(expected)
