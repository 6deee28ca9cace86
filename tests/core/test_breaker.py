"""The circuit breaker that keeps a down Redis from costing every read its timeout."""

from __future__ import annotations

from tally.core.breaker import Breaker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_and_lets_one_trial_through_after_cooldown() -> None:
    clock = Clock()
    b = Breaker(threshold=2, cooldown_s=5.0, clock=clock)
    assert b.allow()
    b.failure()
    assert b.allow() and not b.is_open
    b.failure()
    assert b.is_open and not b.allow() and b.opened == 1
    clock.now = 5.1
    assert b.allow()  # the trial call
    assert not b.allow()  # only one at a time while half-open
    b.failure()
    assert not b.allow() and b.opened == 2
    clock.now = 10.3
    assert b.allow()
    b.success()
    assert b.allow() and b.allow() and not b.is_open
