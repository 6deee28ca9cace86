"""Space-Saving: the guarantees the hot-item cache relies on."""

from __future__ import annotations

import random
from collections import Counter

from tally.core.hotkeys import SpaceSaving


def stream(seed: int, n: int, keys: int) -> list[str]:
    rng = random.Random(seed)
    heavy = ["viral", "trend"]
    return [rng.choice(heavy) if rng.random() < 0.3 else f"k{rng.randrange(keys)}"
            for _ in range(n)]


def test_guarantees_on_a_skewed_stream() -> None:
    for seed in range(5):
        data = stream(seed, 20_000, 5_000)
        truth = Counter(data)
        k = 20
        ss = SpaceSaving(k)
        for key in data:
            ss.add(key)
        assert ss.total == len(data)
        tracked = {key: (est, err) for key, est, err in ss.top()}
        assert len(tracked) == k
        for key, count in truth.items():
            if count > len(data) / k:
                assert key in tracked, key  # every key above n/k is tracked
        for key, (est, err) in tracked.items():
            assert est - err <= truth[key] <= est  # the estimate brackets the truth
            assert err <= len(data) / k  # and over-estimates by at most n/k
        assert [key for key, _, _ in ss.top(2)] == sorted(["viral", "trend"],
                                                          key=lambda x: -tracked[x][0])
        assert ss.is_hot("viral", 0.1) and not ss.is_hot("k1", 0.1)


def test_weights_and_decay() -> None:
    ss = SpaceSaving(2)
    ss.add("a", 10)
    ss.add("b", 3)
    ss.add("c")  # evicts b (the smallest): c inherits b's 3 as its error
    assert ss.top() == [("a", 10, 0), ("c", 4, 3)]
    assert not ss.is_hot("c", 0.1)  # guaranteed count 1 of 14
    ss.decay()
    assert (ss.total, ss.top()) == (7, [("a", 5, 0), ("c", 2, 1)])
    assert not SpaceSaving().is_hot("x", 0.0)


def test_hot_items_are_the_keys_is_hot_names() -> None:
    sketch = SpaceSaving(4)
    assert sketch.hot_items(0.1) == frozenset()
    for key, n in (("a", 50), ("b", 30), ("c", 15), ("d", 4), ("e", 1)):
        sketch.add(key, n)
    for share in (0.01, 0.1, 0.2, 0.4, 0.6):
        assert sketch.hot_items(share) == {k for k in "abcde" if sketch.is_hot(k, share)}
