"""Coalescing: one delta per key, rollups per day and region, redeliveries skipped."""

from __future__ import annotations

import calendar

from tally.core.coalesce import coalesce, day_of
from tally.core.model import Event

DAY1 = calendar.timegm((2026, 3, 1, 23, 59, 0, 0, 0, 0))
DAY2 = DAY1 + 120


def ev(seq: int, item: str, delta: int, ts: float = DAY1, region: str = "eu",
       counter: str = "like", source: str = "local") -> Event:
    return Event(seq, counter, item, "u", delta, ts, region, source)


def test_sums_per_key_and_drops_zero_sums() -> None:
    b = coalesce([ev(1, "post:1", 1), ev(2, "post:1", 1), ev(3, "post:2", 1), ev(4, "post:2", -1),
                  ev(5, "post:1", 1, counter="save"), ev(6, "reel:1", 5, counter="view")])
    assert b.deltas == {("like", "post:1"): 2, ("save", "post:1"): 1, ("view", "reel:1"): 5}
    assert (b.events, b.skipped, b.positions, b.oldest_ts) == (6, 0, {"local": 6}, DAY1)


def test_rollups_per_day_and_region() -> None:
    b = coalesce([ev(1, "post:1", 1), ev(2, "post:2", 1, ts=DAY2, region="us"),
                  ev(3, "post:3", 1, ts=DAY2), ev(4, "post:3", -1, ts=DAY2)])
    assert day_of(DAY1) == "2026-03-01" and day_of(DAY2) == "2026-03-02"
    assert b.rollups == {("like", "post", "day", "2026-03-01"): 1,
                         ("like", "post", "day", "2026-03-02"): 1,
                         ("like", "post", "region", "eu"): 1, ("like", "post", "region", "us"): 1}
    assert coalesce([ev(1, "post:1", 1)], rollups=("region",)).rollups == {
        ("like", "post", "region", "eu"): 1}
    assert coalesce([ev(1, "post:1", 1)], rollups=()).rollups == {}


def test_redeliveries_at_or_below_the_watermark_are_skipped() -> None:
    events = [ev(4, "post:1", 1), ev(5, "post:1", 1), ev(6, "post:1", 1), ev(5, "post:1", 1),
              ev(3, "post:9", 1, source="other"), ev(2, "post:9", 1, source="other")]
    b = coalesce(events, applied={"local": 4, "other": 2})
    assert b.deltas == {("like", "post:1"): 2, ("like", "post:9"): 1}
    assert (b.events, b.skipped) == (3, 3)
    assert b.positions == {"local": 6, "other": 3}


def test_everything_redelivered_moves_nothing() -> None:
    b = coalesce([ev(1, "post:1", 1), ev(2, "post:1", 1)], applied={"local": 2})
    assert (b.deltas, b.positions, b.events, b.skipped, b.oldest_ts) == ({}, {}, 0, 2, None)
