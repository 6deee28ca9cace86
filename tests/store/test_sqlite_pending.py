"""The deltas logged but not yet in the counts: exact answers at any snapshot of the counts."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from tally.store.sqlite import store as sqlite_module
from tally.store.sqlite.aggregate import apply_range
from tally.store.sqlite.store import SqliteStore
from tests.helpers import like, recount, stored

K, L = ("like", "post:1"), ("like", "post:2")


@pytest.mark.anyio
async def test_answers_stay_exact_while_rounds_commit_beside_them(
        store: SqliteStore, db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Likes of one item, one after another, while aggregation rounds commit in the counts
    writer (each held open a moment before committing, so that writes read the counts on both
    sides of a round's commit): the answers are 1..n in order."""
    def slow_apply(*args: Any) -> dict[tuple[str, str], int]:
        time.sleep(0.002)
        return apply_range(*args)

    monkeypatch.setattr(sqlite_module, "apply_range", slow_apply)
    n, done = 200, asyncio.Event()

    async def rounds() -> int:
        applied = 0
        while not done.is_set():
            applied += (await store.aggregate("aggregator", 3, ("day",))).events
        return applied

    aggregating = asyncio.create_task(rounds())
    counts = []
    for user in range(n):
        res = await store.write([like(user, "post:1"), like(user, "post:2")])
        counts.append(res[0].count)
    done.set()
    assert await aggregating > 0
    assert counts == list(range(1, n + 1))
    while (await store.aggregate("aggregator", 1000, ())).events:
        pass
    assert (await store.write([like(n, "post:1")]))[0].count == n + 1  # nothing counted twice
    while (await store.aggregate("aggregator", 1000, ())).events:
        pass
    assert stored(db) == recount(db) == {K: n + 1, L: n}
