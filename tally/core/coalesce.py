"""Coalescing: many change events become one delta per (counter, item) and per rollup bucket.

This is why a viral item costs one count write per aggregation window, whatever its like rate.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from tally.core.model import CountKey, Event, split_item

RollupKey = tuple[str, str, str, str]  # (counter, item_type, dimension, bucket)


@dataclass
class Batch:
    """Deltas to apply in one transaction, with the log position they bring the watermark to."""

    deltas: dict[CountKey, int] = field(default_factory=dict)
    rollups: dict[RollupKey, int] = field(default_factory=dict)
    last_seq: int = 0
    events: int = 0
    oldest_ts: float | None = None


def day_of(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def coalesce(events: Iterable[Event], rollups: Iterable[str] = ("day", "region")) -> Batch:
    """Sum deltas per key; zero-sum keys are dropped (a like and unlike in one window cost nothing)."""
    dims = tuple(rollups)
    deltas: dict[CountKey, int] = defaultdict(int)
    rolled: dict[RollupKey, int] = defaultdict(int)
    batch = Batch()
    for ev in events:
        deltas[(ev.counter, ev.item)] += ev.delta
        item_type = split_item(ev.item)[0]
        if "day" in dims:
            rolled[(ev.counter, item_type, "day", day_of(ev.ts))] += ev.delta
        if "region" in dims:
            rolled[(ev.counter, item_type, "region", ev.region)] += ev.delta
        batch.last_seq = max(batch.last_seq, ev.seq)
        batch.events += 1
        if batch.oldest_ts is None or ev.ts < batch.oldest_ts:
            batch.oldest_ts = ev.ts
    batch.deltas = {k: v for k, v in deltas.items() if v}
    batch.rollups = {k: v for k, v in rolled.items() if v}
    return batch
