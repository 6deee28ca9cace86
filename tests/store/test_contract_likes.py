"""LikeStore contract: toggles are idempotent, increments dedupe by key, answers show your change."""

from __future__ import annotations

import asyncio
import random

import pytest

from tally.core.model import IncrOp, ToggleOp
from tally.core.toggle import replay
from tests.store.harness import Harness

pytestmark = pytest.mark.anyio


def like(user: str, item: str = "post:1", on: bool = True, counter: str = "like") -> ToggleOp:
    return ToggleOp(counter=counter, item=item, user=user, on=on, region="eu")


async def test_toggle_changes_once_and_has_reports_state(harness: Harness) -> None:
    harness.need("likes")
    first, again = await harness.likes.write([like("u1")]), await harness.likes.write([like("u1")])
    assert (first[0].changed, first[0].state, first[0].count) == (True, True, 1)
    assert (again[0].changed, again[0].state) == (False, True)
    assert await harness.likes.has("like", "u1", ["post:1", "post:2"]) == [True, False]
    off = await harness.likes.write([like("u1", on=False)])
    assert (off[0].changed, off[0].state) == (True, False)
    assert (await harness.likes.write([like("u1", on=False)]))[0].changed is False
    assert await harness.likes.has("like", "u1", ["post:1"]) == [False]
    assert await harness.likes.has("save", "u1", ["post:1"]) == [False]


async def test_clear_of_a_never_set_toggle_changes_nothing(harness: Harness) -> None:
    harness.need("likes", "counts")
    res = await harness.likes.write([like("ghost", on=False)])
    assert (res[0].changed, res[0].count, res[0].seq) == (False, 0, None)
    assert await harness.pump() == 0


async def test_answer_shows_the_writers_own_change_over_applied_counts(harness: Harness) -> None:
    harness.need("likes", "counts")
    await harness.likes.write([like(f"u{i}") for i in range(3)])
    await harness.pump()
    assert (await harness.likes.write([like("u3")]))[0].count == 4
    await harness.pump()
    assert (await harness.likes.write([like("u0", on=False)]))[0].count == 3
    assert (await harness.likes.write([like("u9", item="post:fresh")]))[0].count == 1


async def test_one_request_replays_ops_in_order(harness: Harness) -> None:
    harness.need("likes", "counts")
    res = await harness.likes.write([like("u1"), like("u1", on=False), like("u1"), like("u1")])
    assert [r.changed for r in res] == [True, True, True, False]
    assert [r.count for r in res] == [1, 0, 1, 1]
    assert await harness.pump() == 3
    assert await harness.counts.get([("like", "post:1")]) == {("like", "post:1"): 1}


async def test_bulk_spanning_users_and_items(harness: Harness) -> None:
    harness.need("likes", "counts")
    ops = [like(f"user{u}", item=f"post:{i}") for u in range(20) for i in range(5)]
    res = await harness.likes.write(ops)
    assert all(r.changed for r in res)
    assert {r.seq for r in res} != {None}
    await harness.pump()
    got = await harness.counts.get([("like", f"post:{i}") for i in range(5)])
    assert got == {("like", f"post:{i}"): 20 for i in range(5)}
    for u in (0, 7, 19):
        assert await harness.likes.has("like", f"user{u}", [f"post:{i}" for i in range(6)]) == [
            True] * 5 + [False]


async def test_increments_dedupe_by_idempotency_key(harness: Harness) -> None:
    harness.need("likes", "counts")

    def view(n: int, key: str | None) -> IncrOp:
        return IncrOp(counter="view", item="reel:9", n=n, region="eu", idempotency_key=key)

    res = await harness.likes.write([view(2, "k1"), view(2, "k1"), view(5, None)])
    assert [r.changed for r in res] == [True, False, True]
    assert [r.count for r in res] == [2, 2, 7]
    retry = await harness.likes.write([view(2, "k1"), view(3, "k2")])
    assert [r.changed for r in retry] == [False, True]
    await harness.pump()
    assert await harness.counts.get([("view", "reel:9")]) == {("view", "reel:9"): 10}


async def test_concurrent_writers_on_one_hot_item(harness: Harness) -> None:
    harness.need("likes", "counts")
    users = [f"fan{i}" for i in range(60)]
    # Every user likes twice, concurrently, in separate requests: each like lands once.
    results = await asyncio.gather(*(harness.likes.write([like(u, "post:hot")])
                                     for u in users + users))
    assert sum(r[0].changed for r in results) == len(users)
    await harness.pump()
    assert await harness.counts.get([("like", "post:hot")]) == {("like", "post:hot"): 60}
    unlikes = await asyncio.gather(*(harness.likes.write([like(u, "post:hot", on=False)])
                                     for u in users[:25]))
    assert all(r[0].changed for r in unlikes)
    await harness.pump()
    assert await harness.counts.get([("like", "post:hot")]) == {("like", "post:hot"): 35}


async def test_restart_keeps_toggles_keys_and_unapplied_changes(harness: Harness) -> None:
    harness.need("likes", "counts")
    await harness.likes.write([like("u1"), like("u2"),
                               IncrOp(counter="share", item="post:1", n=1, region="eu",
                                      idempotency_key="s1")])
    await harness.reopen()
    assert await harness.likes.has("like", "u1", ["post:1"]) == [True]
    again = await harness.likes.write([like("u1"), IncrOp(counter="share", item="post:1", n=1,
                                                          region="eu", idempotency_key="s1")])
    assert [r.changed for r in again] == [False, False]
    assert await harness.pump() == 3
    assert await harness.counts.get([("like", "post:1"), ("share", "post:1")]) == {
        ("like", "post:1"): 2, ("share", "post:1"): 1}


@pytest.mark.parametrize("seed", [20261128, 7, 1999])
async def test_every_backend_follows_the_core_toggle_rule(harness: Harness, seed: int) -> None:
    """Seeded random requests (singles and bulks, repeats and reversals of one toggle within a
    request, two counters, a restart midway): each op's changed flag, the final states and the
    counts are what ``tally.core.toggle.replay`` says, per (counter, user, item)."""
    harness.need("likes", "counts")
    rng = random.Random(seed)
    users, items = [f"m{i}" for i in range(8)], [f"post:{i}" for i in range(5)]
    state: dict[tuple[str, str, str], bool] = {}
    deltas: dict[tuple[str, str], int] = {}
    for n in range(50):
        ops = [like(rng.choice(users), rng.choice(items), rng.random() < 0.6,
                    counter=rng.choice(("like", "like", "save")))
               for _ in range(rng.choice((1, 1, 2, 5, 9)))]
        by_key: dict[tuple[str, str, str], list[int]] = {}
        for idx, op in enumerate(ops):
            by_key.setdefault((op.counter, op.user, op.item), []).append(idx)
        expected = [False] * len(ops)
        for key, idxs in by_key.items():
            r = replay(state.get(key, False), [ops[i].on for i in idxs])
            for i, changed in zip(idxs, r.changed, strict=True):
                expected[i] = changed
            state[key] = r.state
            deltas[(key[0], key[2])] = deltas.get((key[0], key[2]), 0) + r.delta
        got = await harness.likes.write(ops)
        assert [r.changed for r in got] == expected
        assert [r.state for r in got] == [op.on for op in ops]
        if rng.random() < 0.2:
            await harness.pump()
        if n == 25:
            await harness.reopen()
    await harness.pump()
    keys = [(c, i) for c in ("like", "save") for i in items]
    counts = await harness.counts.get(keys)
    assert {k: counts.get(k, 0) for k in keys} == {k: deltas.get(k, 0) for k in keys}
    for ckey in keys:  # the rule's deltas sum to the number of toggles on
        assert deltas.get(ckey, 0) == sum(on for (c, _, i), on in state.items() if (c, i) == ckey)
    for counter in ("like", "save"):
        for user in users:
            assert await harness.likes.has(counter, user, items) == [
                state.get((counter, user, i), False) for i in items]
