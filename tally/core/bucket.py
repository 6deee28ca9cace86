"""Token buckets keyed by name (an API key, a user), in memory: the fair-use limit of one process.

A bucket holds at most ``burst`` tokens and refills at ``rate`` tokens a second; a request takes
one (or ``cost``). The time is passed in, so the arithmetic is pure and property-tested. The same
arithmetic runs as a Lua script in Redis when a cluster shares its buckets
(``tally.store.rediscache.buckets``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

# Buckets kept at most: it bounds memory under a flood of distinct names. A full bucket holds no
# information (a new one is full too), and one untouched for burst/rate seconds (``BURST_S`` at
# any rate of 0.1/s or more) has refilled, so dropping the one untouched longest loses nothing
# unless this many other names took within that time.
MAX_BUCKETS = 100_000
SHARD_BUCKETS = 2048  # buckets per shard once there are enough to split (see Buckets)
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
    """Named buckets of one rate; ``take`` answers 0.0 (go) or the seconds until a token.

    Each new name beyond ``max_buckets`` drops the bucket untouched longest: one per new name,
    not a sweep of every bucket once the bound is reached (on the event loop that sweep, and the
    table rebuilt after it, paused every request each time another ``max_buckets`` new users had
    come). The buckets are split by the name's hash into shards of about ``SHARD_BUCKETS``, each
    kept in the order its buckets were last taken from, so the table a steady stream of drops
    leaves to be rebuilt is a shard's, not all of them."""

    def __init__(self, rate: Rate, max_buckets: int = MAX_BUCKETS) -> None:
        self.rate = rate
        self.max_buckets = max_buckets
        n = 1
        while n * 2 * SHARD_BUCKETS <= max_buckets:
            n *= 2  # a power of two: the shard is a mask of the hash
        self._mask = n - 1
        self._shard_size = max(1, max_buckets // n)  # floor: the shards hold at most the bound
        self._shards: list[OrderedDict[str, complex]] = [OrderedDict() for _ in range(n)]

    def take(self, name: str, now: float, cost: float = 1.0) -> float:
        """``cost`` tokens from one bucket: 0.0, or the seconds until it has them."""
        refused = self.take_all((name,), now, cost)
        return 0.0 if refused is None else refused[1]

    def take_all(self, names: Sequence[str], now: float, cost: float = 1.0
                 ) -> tuple[str, float] | None:
        """``cost`` tokens from each named bucket (distinct names), or from none: None when all
        were taken, else the first name short of them and the seconds until it has them. A bulk
        request names many users; one of them over the limit refuses the request, and a refused
        request costs nobody a token, as a refused take changes nothing."""
        shards, mask, rate = self._shards, self._mask, self.rate
        granted: list[tuple[OrderedDict[str, complex], str, float]] = []
        for name in names:
            shard = shards[hash(name) & mask]
            state = shard.get(name)
            tokens, stamp = (rate.burst, now) if state is None else (state.real, state.imag)
            level, _, wait = take(tokens, stamp, rate, now, cost)
            if wait:
                if state is not None:
                    shard.move_to_end(name)  # a name refused while it floods is still in use
                return name, wait
            granted.append((shard, name, level))
        for shard, name, level in granted:
            if name in shard:
                shard.move_to_end(name)
            elif len(shard) >= self._shard_size:
                shard.popitem(last=False)
            # Both floats in one complex, not a tuple: a tuple is an object the garbage
            # collector tracks until its next collection, and a new one per take that replaces
            # an old one leaves the collector's allocation count where it was, so the young
            # generation grew to every bucket written since and its collection then walked all
            # of them at once.
            shard[name] = complex(level, now)
        return None

    def __len__(self) -> int:
        return sum(len(shard) for shard in self._shards)
