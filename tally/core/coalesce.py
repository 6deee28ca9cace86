"""Coalescing: many change events become one delta per (counter, item) and per rollup bucket.

This is why a viral item costs one count write per aggregation window, whatever its like rate.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from tally.core.model import CountKey, Event, split_item

RollupKey = tuple[str, str, str, str]  # (counter, item_type, dimension, bucket)


@dataclass
class Batch:
    """Deltas to apply in one transaction, with the log positions (per source) they reach."""

    deltas: dict[CountKey, int] = field(default_factory=dict)
    rollups: dict[RollupKey, int] = field(default_factory=dict)
    positions: dict[str, int] = field(default_factory=dict)  # source -> newest seq included
    events: int = 0
    skipped: int = 0  # redelivered events at or below the watermark
    oldest_ts: float | None = None


@functools.lru_cache(maxsize=64)
def _day(days_since_epoch: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(days_since_epoch * 86_400))


def day_of(ts: float) -> str:
    """UTC day of a timestamp; formatted once per day, not once per event. ``int(ts / 86400)``
    is the float division SQLite's in-place aggregation does too, so both name the same day for
    a timestamp a rounding error away from midnight."""
    return _day(int(ts / 86_400))


def coalesce(events: Iterable[Event], rollups: Collection[str] = ("day", "region"),
             applied: Mapping[str, int] | None = None) -> Batch:
    """Sum deltas per key; zero-sum keys are dropped (a like and unlike in one window cost nothing).

    ``applied`` holds the consumer's watermark per source: an event at or below it was applied
    already (a redelivery) and is skipped, so exactly-once does not depend on the broker.
    """
    by_day, by_region = "day" in rollups, "region" in rollups
    applied = applied or {}
    deltas: dict[CountKey, int] = defaultdict(int)
    rolled: dict[RollupKey, int] = defaultdict(int)
    batch = Batch()
    positions = batch.positions
    for ev in events:
        if ev.seq <= applied.get(ev.source, 0) or ev.seq <= positions.get(ev.source, 0):
            batch.skipped += 1
            continue
        deltas[(ev.counter, ev.item)] += ev.delta
        if by_day or by_region:
            item_type = split_item(ev.item)[0]
            if by_day:
                rolled[(ev.counter, item_type, "day", day_of(ev.ts))] += ev.delta
            if by_region:
                rolled[(ev.counter, item_type, "region", ev.region)] += ev.delta
        positions[ev.source] = ev.seq
        batch.events += 1
        if batch.oldest_ts is None or ev.ts < batch.oldest_ts:
            batch.oldest_ts = ev.ts
    batch.deltas = {k: v for k, v in deltas.items() if v}
    batch.rollups = {k: v for k, v in rolled.items() if v}
    return batch
