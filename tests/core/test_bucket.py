"""The token bucket's arithmetic, as properties over any sequence of takes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tally.core.bucket import Buckets, Rate

rates = st.builds(Rate, st.floats(0.1, 1000), st.floats(1, 1000))
gaps = st.lists(st.floats(0, 5), min_size=1, max_size=200)


@settings(deadline=None)  # a loaded machine must not fail a property on time
@given(rates, gaps)
def test_never_more_than_the_burst_plus_the_refill(rate: Rate, steps: list[float]) -> None:
    buckets, now, granted = Buckets(rate), 0.0, 0
    for gap in steps:
        now += gap
        granted += buckets.take("u", now) == 0.0
    assert granted <= rate.burst + rate.rate * now + 1e-6


@settings(deadline=None)  # a loaded machine must not fail a property on time
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


@settings(deadline=None)
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
