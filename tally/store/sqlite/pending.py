"""The deltas a likes writer logged that the counts do not hold yet: what makes answers exact.

A write answers with the exact count: the count table's value plus the deltas of the change log
that the table does not hold yet. The table is written by the counts writer, the log by a likes
writer, each in its own file (and process). The likes writer reads the table together with the
watermark ``W`` it holds (the position of the log its snapshot of the counts includes) and adds
exactly its own events after ``W``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from tally.core.model import CountKey


class LoggedSince:
    """The deltas one likes writer logged after the counts' watermark, kept by that writer alone.

    The writer shares no memory with the counts writer, so it cannot be told which deltas a round
    took. It does not need to be: it logged every event itself, in sequence order, and each answer
    reads the count table together with the watermark ``W`` it holds; the deltas to add are
    exactly its events after ``W``.
    Events at or below a watermark it has seen leave here for good (watermarks only move on).
    One thread uses it (the writer's), so it takes no lock."""

    def __init__(self, events: Iterable[tuple[int, CountKey, int]] = ()) -> None:
        self._events: deque[tuple[int, CountKey, int]] = deque()
        self._sums: dict[CountKey, int] = {}
        self.position = 0  # the newest watermark seen: no event at or below it is kept
        self.add(events)

    def add(self, events: Iterable[tuple[int, CountKey, int]]) -> None:
        """Events just logged, in sequence order."""
        sums = self._sums
        for event in events:
            self._events.append(event)
            _seq, key, d = event
            total = sums.get(key, 0) + d
            if total:
                sums[key] = total
            else:
                sums.pop(key, None)

    def drop_after(self, seq: int) -> None:
        """Forget the events after ``seq``: their transaction rolled back."""
        while self._events and self._events[-1][0] > seq:
            self._subtract(self._events.pop())

    def since(self, keys: Iterable[CountKey], position: int) -> dict[CountKey, int]:
        """The deltas after ``position`` per key (0 left out). Asked after a watermark older
        than ``self.position``, it still answers after ``self.position``: those events are gone."""
        self.position = max(self.position, position)
        while self._events and self._events[0][0] <= position:
            self._subtract(self._events.popleft())
        sums = self._sums
        return {key: sums[key] for key in keys if sums.get(key)}

    def __len__(self) -> int:
        return len(self._events)

    def _subtract(self, event: tuple[int, CountKey, int]) -> None:
        _seq, key, d = event
        total = self._sums.get(key, 0) - d
        if total:
            self._sums[key] = total
        else:
            self._sums.pop(key, None)
