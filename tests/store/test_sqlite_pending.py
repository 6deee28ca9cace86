"""Unapplied deltas between the two SQLite writers: exact counts at any snapshot of the counts."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from tally.store.sqlite import store as sqlite_module
from tally.store.sqlite.aggregate import apply_range
from tally.store.sqlite.pending import Unapplied
from tally.store.sqlite.store import SqliteStore
from tests.helpers import like, recount, stored

K, L = ("like", "post:1"), ("like", "post:2")


@pytest.fixture
def group_commit_ms() -> float:
    return 0  # commit at once, so that writes land inside the rounds' windows


def test_a_reader_behind_a_round_adds_its_deltas_back() -> None:
    u = Unapplied({K: 5, L: 1})
    u.take(10, {K: 3})  # a round reaching 10 is committing 3 of K's 5
    assert u.since([K, L], 7) == {K: 5, L: 1}  # its snapshot predates the round
    assert u.since([K, L], 10) == {K: 2, L: 1}  # its snapshot holds the round
    assert u.since([K], 7) == {K: 2}  # rounds at or before a seen position are forgotten


def test_a_round_that_does_not_commit_gives_its_deltas_back() -> None:
    u = Unapplied({K: 5})
    u.take(10, {K: 5})
    u.add({K: 1})
    assert u.since([K], 3) == {K: 6}
    u.give_back(10)
    assert u.since([K], 3) == {K: 6} and u.snapshot() == {K: 6}
    u.add({K: 6}, -1)
    assert u.snapshot() == {}


@pytest.mark.anyio
async def test_answers_stay_exact_while_rounds_commit_beside_them(
        store: SqliteStore, db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Likes of one item, one after another, while aggregation rounds commit in the other writer
    (each held open a moment between taking its deltas and committing, so that writes read the
    counts inside that window): the answers are 1..n in order."""
    def slow_apply(*args: Any) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]]:
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
    assert store.unapplied.snapshot() == {}
    assert stored(db) == recount(db) == {K: n, L: n}
