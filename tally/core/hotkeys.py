"""Space-Saving heavy-hitter sketch: the top-k keys of a stream in O(k) memory.

Metwally et al., 2005. Each tracked key has a count that over-estimates its true frequency by at
most ``error``; a key whose true frequency exceeds n/k is guaranteed to be tracked.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass


@dataclass(slots=True)
class _Slot:
    count: int
    error: int


class SpaceSaving:
    """Not thread-safe: fed from the event loop only.

    The minimum is found through a lazy min-heap (stale entries are skipped or refreshed when
    they surface), so adding a key costs O(log k) amortised instead of a scan of all k slots.
    """

    def __init__(self, k: int = 32) -> None:
        self.k = k
        self.total = 0
        self._slots: dict[str, _Slot] = {}
        self._heap: list[tuple[int, str]] = []

    def add(self, key: str, weight: int = 1) -> None:
        self.total += weight
        slot = self._slots.get(key)
        if slot is not None:
            slot.count += weight
            return
        if len(self._slots) < self.k:
            self._slots[key] = _Slot(weight, 0)
            heapq.heappush(self._heap, (weight, key))
            return
        floor, victim = self._pop_min()
        del self._slots[victim]
        self._slots[key] = _Slot(floor + weight, floor)
        heapq.heappush(self._heap, (floor + weight, key))
        if len(self._heap) > 8 * self.k:
            self._heap = [(s.count, k) for k, s in self._slots.items()]
            heapq.heapify(self._heap)

    def _pop_min(self) -> tuple[int, str]:
        while True:
            count, key = heapq.heappop(self._heap)
            slot = self._slots.get(key)
            if slot is None:
                continue  # evicted earlier
            if slot.count == count:
                return count, key
            heapq.heappush(self._heap, (slot.count, key))  # grew since pushed: re-file it

    def top(self, n: int | None = None) -> list[tuple[str, int, int]]:
        """(key, estimated count, maximum over-estimate), most frequent first."""
        items = [(k, s.count, s.error) for k, s in self._slots.items()]
        return heapq.nlargest(n or self.k, items, key=lambda t: t[1])

    def is_hot(self, key: str, share: float) -> bool:
        """True when the key's guaranteed count (count - error) is at least share of the stream."""
        slot = self._slots.get(key)
        return slot is not None and self.total > 0 and (slot.count - slot.error) >= share * self.total

    def hot_items(self, share: float) -> frozenset[str]:
        """Every key ``is_hot`` at ``share``, at once: a reader checking many keys tests each
        against this set instead of asking for each."""
        if self.total <= 0:
            return frozenset()
        floor = share * self.total
        return frozenset(k for k, s in self._slots.items() if s.count - s.error >= floor)

    def decay(self) -> None:
        """Halve every count so the sketch follows what is hot now, not what was hot an hour ago."""
        self.total //= 2
        for slot in self._slots.values():
            slot.count //= 2
            slot.error //= 2
        self._heap = [(s.count, k) for k, s in self._slots.items()]
        heapq.heapify(self._heap)
