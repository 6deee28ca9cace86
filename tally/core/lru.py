"""A bounded LRU map with a time-to-live, for counts read far more often than they change."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """Not thread-safe: used from the event loop only."""

    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self._clock = clock
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        """Held, fresh or not (no hit or miss counted)."""
        return key in self._data

    def get(self, key: K) -> V | None:
        entry = self._data.get(key)
        if entry is None or entry[0] < self._clock():
            if entry is not None:
                del self._data[key]
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return entry[1]

    def put(self, key: K, value: V, ttl_s: float | None = None) -> None:
        self._data[key] = (self._clock() + (self.ttl_s if ttl_s is None else ttl_s), value)
        self._data.move_to_end(key)
        if len(self._data) > self.size:
            self._data.popitem(last=False)

    def put_if_absent(self, key: K, value: V) -> None:
        """Store a value read from the table unless a fresher one was written meanwhile."""
        entry = self._data.get(key)
        if entry is None or entry[0] < self._clock():
            self.put(key, value)

    def discard(self, key: K) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()
