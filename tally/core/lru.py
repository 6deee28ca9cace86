"""A bounded LRU map with a time-to-live, for counts read far more often than they change."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

SHARD_ENTRIES = 2048  # entries per shard once the cache is large enough to be split


class LRU(Generic[K, V]):
    """Not thread-safe: used from the event loop only.

    A large cache is split by key hash into shards of about ``SHARD_ENTRIES``, each its own
    LRU. A dict rebuilds its table as it grows and, under steady insert-and-evict churn, every
    few hundred thousand inserts: on one 200k-entry map that froze the event loop for 10-20 ms
    (the feed workload's p99.9). Per shard the rebuild is a few hundred microseconds. Eviction is
    then least-recently-used within the key's shard, which approximates the global order."""

    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self._clock = clock
        n = 1
        while n * 2 * SHARD_ENTRIES <= size:
            n *= 2  # a power of two: the shard is a mask of the hash
        self._mask = n - 1
        self._shards: list[OrderedDict[K, tuple[float, V]]] = [OrderedDict() for _ in range(n)]
        self._shard_size = -(-size // n)  # ceil: the shards together hold at least ``size``
        self.hits = 0
        self.misses = 0

    def _shard(self, key: K) -> OrderedDict[K, tuple[float, V]]:
        return self._shards[hash(key) & self._mask]

    def __len__(self) -> int:
        return sum(len(s) for s in self._shards)

    def __contains__(self, key: object) -> bool:
        """Held, fresh or not (no hit or miss counted)."""
        return key in self._shard(key)  # type: ignore[arg-type]

    def get(self, key: K) -> V | None:
        shard = self._shard(key)
        entry = shard.get(key)
        if entry is None or entry[0] < self._clock():
            if entry is not None:
                del shard[key]
            self.misses += 1
            return None
        shard.move_to_end(key)
        self.hits += 1
        return entry[1]

    def get_many(self, keys: Sequence[K]) -> list[V | None]:
        """``get`` of each key, with one clock reading for all: a feed asks for fifty at once,
        and per key the call and the clock were most of a lookup's cost."""
        now, shards, mask = self._clock(), self._shards, self._mask
        out: list[V | None] = []
        hits = 0
        for key in keys:
            shard = shards[hash(key) & mask]
            entry = shard.get(key)
            if entry is None or entry[0] < now:
                if entry is not None:
                    del shard[key]
                out.append(None)
            else:
                shard.move_to_end(key)
                hits += 1
                out.append(entry[1])
        self.hits += hits
        self.misses += len(out) - hits
        return out

    def put(self, key: K, value: V, ttl_s: float | None = None) -> None:
        shard = self._shard(key)
        shard[key] = (self._clock() + (self.ttl_s if ttl_s is None else ttl_s), value)
        shard.move_to_end(key)
        if len(shard) > self._shard_size:
            shard.popitem(last=False)

    def put_if_absent(self, entries: Mapping[K, V]) -> None:
        """Store values read from the table, each unless a fresher one was written meanwhile
        (one clock reading for all: a feed's misses arrive together)."""
        now, shards, mask, size = self._clock(), self._shards, self._mask, self._shard_size
        expires = now + self.ttl_s
        for key, value in entries.items():
            shard = shards[hash(key) & mask]
            entry = shard.get(key)
            if entry is None:
                shard[key] = (expires, value)
                if len(shard) > size:
                    shard.popitem(last=False)
            elif entry[0] < now:
                shard[key] = (expires, value)
                shard.move_to_end(key)

    def discard(self, key: K) -> None:
        self._shard(key).pop(key, None)

    def clear(self) -> None:
        for shard in self._shards:
            shard.clear()
