"""The deltas logged but not yet in the counts, shared by the two SQLite writers.

A write answers with the exact count: the count table's value plus the deltas of the change log
that the table does not hold yet. The table is written by the counts writer, the log by the likes
writer, each in its own file; the likes writer reads the table at some watermark ``W`` (the
position its snapshot of the counts file holds) and must add exactly the deltas after ``W``.

So a round takes its deltas out of ``pending`` *before* it commits and keeps them, by position,
until no reader can still see the table from before it: a reader whose snapshot is older adds
them back (``since``); one whose snapshot holds the round does not. A round that fails to commit
puts its deltas back. One lock makes each step atomic; both threads hold it for microseconds.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Mapping

from tally.core.model import CountKey


def _merge(into: dict[CountKey, int], deltas: Mapping[CountKey, int], sign: int) -> None:
    for key, d in deltas.items():
        total = into.get(key, 0) + sign * d
        if total:
            into[key] = total
        else:
            into.pop(key, None)


class Unapplied:
    def __init__(self, pending: Mapping[CountKey, int]) -> None:
        self._lock = threading.Lock()
        self._pending = dict(pending)  # every logged delta no round has taken out
        self._rounds: list[tuple[int, Mapping[CountKey, int]]] = []  # (position, deltas)

    def add(self, deltas: Mapping[CountKey, int], sign: int = 1) -> None:
        """A like job logged these deltas (``sign=-1``: its transaction rolled back)."""
        with self._lock:
            _merge(self._pending, deltas, sign)

    def since(self, keys: Iterable[CountKey], position: int) -> dict[CountKey, int]:
        """The deltas after ``position`` per key (0 left out), for a reader whose counts snapshot
        is at ``position``. Rounds at or before it are forgotten: later snapshots are newer."""
        with self._lock:
            self._rounds = [r for r in self._rounds if r[0] > position]
            out: dict[CountKey, int] = {}
            for key in keys:
                d = self._pending.get(key, 0) + sum(r[1].get(key, 0) for r in self._rounds)
                if d:
                    out[key] = d
            return out

    def take(self, position: int, deltas: Mapping[CountKey, int]) -> None:
        """A round reaching ``position`` is about to commit these deltas to the counts."""
        with self._lock:
            _merge(self._pending, deltas, -1)
            self._rounds.append((position, deltas))

    def give_back(self, position: int) -> None:
        """The round reaching ``position`` did not commit."""
        with self._lock:
            for i, (pos, deltas) in enumerate(self._rounds):
                if pos == position:
                    del self._rounds[i]
                    _merge(self._pending, deltas, 1)
                    return

    def snapshot(self) -> dict[CountKey, int]:
        """Every delta not yet in a committed round (tests and metrics)."""
        with self._lock:
            return dict(self._pending)


class LoggedSince:
    """The deltas one likes writer logged after the counts' watermark, kept by that writer alone.

    The writer in a process of its own (``sqlite_writer_process``) shares no memory with the
    counts writer, so it cannot be told which deltas a round took. It does not need to be: it
    logged every event itself, in sequence order, and each answer reads the count table together
    with the watermark ``W`` it holds; the deltas to add are exactly its events after ``W``.
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
