"""The token bucket's arithmetic, as properties over any sequence of takes."""

from __future__ import annotations

import copy

from hypothesis import given
from hypothesis import strategies as st

from tally.core.bucket import Buckets, Rate

rates = st.builds(Rate, st.floats(0.1, 1000), st.floats(1, 1000))
gaps = st.lists(st.floats(0, 5), min_size=1, max_size=200)


@given(rates, gaps)
def test_never_more_than_the_burst_plus_the_refill(rate: Rate, steps: list[float]) -> None:
    buckets, now, granted = Buckets(rate), 0.0, 0
    for gap in steps:
        now += gap
        granted += buckets.take("u", now) == 0.0
    assert granted <= rate.burst + rate.rate * now + 1e-6


@given(rates, gaps)
def test_a_refusal_says_when_a_token_is_back(rate: Rate, steps: list[float]) -> None:
    buckets, now = Buckets(rate), 0.0
    for gap in steps:
        now += gap
        wait = buckets.take("u", now)
        if wait:
            assert 0 < wait <= 1 / rate.rate + 1e-9
            assert buckets.take("u", now + wait + 1e-9) == 0.0
            now += wait + 1e-9


@given(rates)
def test_a_full_burst_is_granted_at_once_and_names_are_apart(rate: Rate) -> None:
    buckets = Buckets(rate)
    assert all(buckets.take("a", 0.0) == 0.0 for _ in range(int(rate.burst)))
    assert buckets.take("a", 0.0) > 0
    assert buckets.take("b", 0.0) == 0.0


def test_memory_stays_bounded_under_a_flood_of_names() -> None:
    buckets = Buckets(Rate(1.0, 5.0), max_buckets=100)
    for n in range(1000):
        buckets.take(f"u{n}", n * 0.001)
    assert len(buckets) <= 100


def test_a_busy_name_keeps_its_bucket_through_a_flood_of_new_names() -> None:
    """At the bound a new name drops the bucket untouched longest: one that keeps taking is
    never the one dropped, so a flood of other names does not hand it a full bucket again."""
    buckets = Buckets(Rate(1.0, 5.0), max_buckets=100)
    assert all(buckets.take("busy", 0.0) == 0.0 for _ in range(5))
    for n in range(1000):
        now = n * 0.0001
        buckets.take(f"u{n}", now)
        if n % 50 == 0:
            assert buckets.take("busy", now) > 0  # still empty: 0.1 s refills a tenth of a token
    assert len(buckets) == 100


def test_the_bound_drops_the_bucket_untouched_longest_one_at_a_time() -> None:
    buckets = Buckets(Rate(1.0, 1.0), max_buckets=3)
    for name in ("a", "b", "c"):
        assert buckets.take(name, 0.0) == 0.0  # each bucket is now empty
    assert buckets.take("a", 0.0) > 0  # a taken again: b is now the one untouched longest
    assert buckets.take("d", 0.0) == 0.0  # drops b, only b
    assert len(buckets) == 3
    assert buckets.take("a", 0.0) > 0 and buckets.take("c", 0.0) > 0
    assert buckets.take("b", 0.0) == 0.0  # started over, full


def test_a_sharded_table_holds_its_bound() -> None:
    buckets = Buckets(Rate(1.0, 5.0), max_buckets=20_000)  # split in shards
    for n in range(30_000):
        buckets.take(f"u{n}", 0.0)
    assert 19_000 < len(buckets) <= 20_000


@given(st.builds(Rate, st.floats(0.1, 5), st.floats(1, 4)),  # small: refusals are common
       st.lists(st.tuples(st.sets(st.sampled_from("abcdef"), min_size=1), st.floats(0, 1)),
                min_size=1, max_size=60))
def test_a_take_of_several_buckets_is_all_or_nothing(
        rate: Rate, takes: list[tuple[set[str], float]]) -> None:
    """A take of several names (a bulk request's users) leaves each bucket as a take of that
    name alone would, when every one of them has the tokens; otherwise it names the first short
    one, with that take's wait, and leaves every bucket as it was."""
    buckets, now = Buckets(rate), 0.0

    def held() -> dict[str, complex]:
        return {n: v for shard in buckets._shards for n, v in shard.items()}

    for names, gap in takes:
        now += gap
        order = sorted(names)
        alone = copy.deepcopy(buckets)
        waits = [alone.take(n, now) for n in order]
        before = held()
        refused = buckets.take_all(order, now)
        if refused is None:
            assert waits == [0.0] * len(order)
            assert held() == {n: v for shard in alone._shards for n, v in shard.items()}
        else:
            first = next(k for k, wait in enumerate(waits) if wait)
            assert refused == (order[first], waits[first])
            assert held() == before
