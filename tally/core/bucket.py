"""Token buckets keyed by name (an API key, a user), in memory: the fair-use limit of one process.

A bucket holds at most ``burst`` tokens and refills at ``rate`` tokens a second; a request takes
one (or ``cost``). The time is passed in, so the arithmetic is pure and property-tested. The same
arithmetic runs as a Lua script in Redis when a cluster shares its buckets
(``tally.store.rediscache.buckets``).
"""

from __future__ import annotations

from dataclasses import dataclass

# Buckets kept before idle ones are dropped: a full bucket holds no information (a new one is
# full too), so dropping those that have refilled loses nothing and bounds memory under a flood
# of distinct keys.
MAX_BUCKETS = 100_000
# A bucket holds this many seconds' worth of its rate: a client may catch up after a pause (a feed
# opened after idling) without being able to hold more than a short stretch of its share.
BURST_S = 10.0


@dataclass(frozen=True, slots=True)
class Rate:
    rate: float  # tokens per second; 0 turns the limit off
    burst: float  # the most tokens a bucket holds (and so the largest burst allowed)

    @classmethod
    def per_second(cls, rate: float) -> Rate:
        return cls(rate, max(1.0, rate * BURST_S))

    @property
    def on(self) -> bool:
        return self.rate > 0


def take(tokens: float, stamp: float, rate: Rate, now: float, cost: float = 1.0
         ) -> tuple[float, float, float]:
    """One bucket's step: (tokens left, new stamp, seconds to wait: 0 when the take succeeded).

    A refused take changes nothing, so a client that keeps knocking is not pushed further back."""
    level = min(rate.burst, tokens + max(0.0, now - stamp) * rate.rate)
    if level >= cost:
        return level - cost, now, 0.0
    return level, now, (cost - level) / rate.rate


class Buckets:
    """Named buckets of one rate; ``take`` answers 0.0 (go) or the seconds until a token."""

    def __init__(self, rate: Rate, max_buckets: int = MAX_BUCKETS) -> None:
        self.rate = rate
        self.max_buckets = max_buckets
        self._state: dict[str, tuple[float, float]] = {}

    def take(self, name: str, now: float, cost: float = 1.0) -> float:
        state = self._state.get(name)
        tokens, stamp = state if state is not None else (self.rate.burst, now)
        tokens, stamp, wait = take(tokens, stamp, self.rate, now, cost)
        if state is None and len(self._state) >= self.max_buckets:
            self._prune(now)
        self._state[name] = (tokens, stamp)
        return wait

    def _prune(self, now: float) -> None:
        """Drop the buckets that have refilled; if none has, the oldest half (a flood of new
        names must not grow memory without bound, and each dropped one merely starts full)."""
        full = [k for k, (t, s) in self._state.items()
                if t + (now - s) * self.rate.rate >= self.rate.burst]
        if not full:
            full = sorted(self._state, key=lambda k: self._state[k][1])[: len(self._state) // 2]
        for k in full:
            del self._state[k]

    def __len__(self) -> int:
        return len(self._state)
