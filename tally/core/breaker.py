"""A circuit breaker: after a failure, skip an optional dependency for a while instead of waiting on it.

Used for the Redis cache on the read path: while Redis is down, every read would otherwise pay
its timeout before falling back to PostgreSQL. Open for ``cooldown_s`` after ``threshold``
consecutive failures; then one trial call at a time is let through (half-open) until one
succeeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Breaker:
    def __init__(self, threshold: int = 1, cooldown_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._failures = 0
        self._open_until = 0.0
        self._trial = False
        self.opened = 0  # times the breaker opened (a metric)

    @property
    def is_open(self) -> bool:
        return self._failures >= self.threshold and self._clock() < self._open_until

    def allow(self) -> bool:
        """Whether to call the dependency now; in half-open state only one caller at a time."""
        if self._failures < self.threshold:
            return True
        if self._clock() < self._open_until or self._trial:
            return False
        self._trial = True
        return True

    def success(self) -> None:
        self._failures = 0
        self._trial = False

    def failure(self) -> None:
        self._failures += 1
        self._trial = False
        if self._failures >= self.threshold:
            if self._clock() >= self._open_until:
                self.opened += 1
            self._open_until = self._clock() + self.cooldown_s
