"""The per-origin count parts merge without conflict; placement and the rejoin rule."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tally.core.errors import InvalidInput
from tally.core.regions import (
    Placement,
    Rejoin,
    hash_home,
    merge_parts,
    newest,
    rejoin_decision,
    total,
)

ORIGINS = st.sampled_from(["us", "eu", "ap"])
# A view is what one region knows: per origin, (applied position, net count at that position).
# Equal positions of one origin always carry equal values (one writer per part), so views are
# drawn from one history per origin.
HISTORIES = st.dictionaries(ORIGINS, st.lists(st.integers(-3, 3), min_size=1, max_size=8),
                            min_size=1)


def views(history: dict[str, list[int]], cut: st.DataObject) -> dict[str, tuple[int, int]]:
    out = {}
    for origin, deltas in history.items():
        pos = cut.draw(st.integers(0, len(deltas)))
        if pos:
            out[origin] = (pos, sum(deltas[:pos]))
    return out


@given(HISTORIES, st.data())
def test_merge_is_commutative_associative_idempotent(history: dict[str, list[int]],
                                                     data: st.DataObject) -> None:
    a, b, c = views(history, data), views(history, data), views(history, data)
    assert merge_parts(a, b) == merge_parts(b, a)
    assert merge_parts(merge_parts(a, b), c) == merge_parts(a, merge_parts(b, c))
    assert merge_parts(a, a) == a
    assert merge_parts(merge_parts(a, b), b) == merge_parts(a, b)


@given(HISTORIES, st.data())
def test_merged_views_reach_the_total_of_every_origin(history: dict[str, list[int]],
                                                      data: st.DataObject) -> None:
    full = {o: (len(d), sum(d)) for o, d in history.items()}
    merged = merge_parts(views(history, data), full)
    assert total(merged) == sum(sum(d) for d in history.values())


def test_hash_home_is_stable_and_spreads() -> None:
    regions = ("eu", "us")
    homes = Counter(hash_home(f"user{i}", regions) for i in range(2000))
    assert set(homes) == {"eu", "us"} and min(homes.values()) > 800
    assert hash_home("user7", regions) == hash_home("user7", regions)


def test_failover_moves_the_failed_regions_users_only() -> None:
    p = Placement.initial(["us", "eu"]).override("alice", "us", now=1.0)
    users = [f"u{i}" for i in range(200)] + ["alice"]
    before = {u: p.home_of(u) for u in users}
    q = p.failover("us", "eu", now=2.0)
    assert q.epoch == p.epoch + 1 and q.since == 2.0
    assert all(q.home_of(u) == "eu" for u in users)
    assert q.serving() == ["eu"]
    back = q.restore("us", now=3.0)
    assert {u: back.home_of(u) for u in users} == before and back.epoch == q.epoch + 1
    assert Placement.from_json(q.to_json()) == q
    assert newest(p, q, None, back) == back
    with pytest.raises(InvalidInput):
        q.failover("eu", "us", now=4.0)  # us serves no one: it cannot take eu's users


def test_placement_rejects_unknown_regions() -> None:
    with pytest.raises(InvalidInput):
        Placement(("eu", "us"), moved={"us": "ap"})
    with pytest.raises(InvalidInput):
        Placement(("us", "eu"))


@pytest.mark.parametrize(("event_on", "record", "expected"), [
    (True, (True, 5.0), Rejoin.AGREE),  # already replicated or decided the same
    (True, None, Rejoin.APPLY),  # the survivor never heard of it
    (True, (False, 5.0), Rejoin.APPLY),  # the record is the old epoch's state
    (True, (False, 15.0), Rejoin.CONFLICT),  # decided again after the failover (epoch at 10)
    (False, (True, 12.0), Rejoin.CONFLICT),
])
def test_rejoin_rule(event_on: bool, record: tuple[bool, float] | None,
                     expected: Rejoin) -> None:
    on, ts = record if record is not None else (None, None)
    assert rejoin_decision(event_on, 9.0, on, ts, epoch_since=10.0) is expected
