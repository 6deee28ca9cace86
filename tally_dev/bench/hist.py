"""Latency recording: HDR histograms per operation kind, and one per second for time series.

Values are microseconds from 1 us to 60 s; larger ones are clamped to the top (and still counted).
Histograms cross process boundaries encoded (HdrHistogram's compressed base64 form), so worker
results merge exactly instead of averaging percentiles.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 60_000_000
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def new_hist(digits: int = 3) -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, digits)


def summary(h: HdrHistogram) -> dict[str, float]:
    """p50/p90/p99/p99.9/max and mean in milliseconds, with the sample count."""
    out: dict[str, float] = {"count": float(h.get_total_count())}
    if not h.get_total_count():
        return out
    for p in PERCENTILES:
        out[f"p{p:g}_ms"] = h.get_value_at_percentile(p) / 1000
    out["max_ms"] = h.get_max_value() / 1000
    out["mean_ms"] = h.get_mean_value() / 1000
    return out


@dataclass
class Recorder:
    """What one worker measured: latency per kind, per second, and every error by reason."""

    kinds: dict[str, HdrHistogram] = field(default_factory=dict)
    seconds: dict[int, HdrHistogram] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    errors_per_second: Counter[int] = field(default_factory=Counter)
    sent: int = 0
    # Open loop: how long each operation waited in the generator for a free connection after
    # its intended time. A large share of the latency here means the pool could not carry the
    # offered rate: the queue was the generator's, not the server's.
    waits: HdrHistogram = field(default_factory=new_hist)

    def ok(self, kind: str, second: int, latency_s: float) -> None:
        us = _us(latency_s)
        h = self.kinds.get(kind)
        if h is None:
            h = self.kinds[kind] = new_hist()
        h.record_value(us)
        s = self.seconds.get(second)
        if s is None:
            s = self.seconds[second] = new_hist(2)
        s.record_value(us)

    def waited(self, wait_s: float) -> None:
        self.waits.record_value(_us(wait_s))

    def error(self, reason: str, second: int) -> None:
        self.errors[reason] += 1
        self.errors_per_second[second] += 1

    def completed(self) -> int:
        return sum(h.get_total_count() for h in self.kinds.values())

    def encode(self) -> dict[str, Any]:
        return {"kinds": {k: h.encode() for k, h in self.kinds.items()},
                "seconds": {s: h.encode() for s, h in self.seconds.items()},
                "errors": dict(self.errors), "errors_per_second": dict(self.errors_per_second),
                "sent": self.sent, "waits": self.waits.encode()}

    @classmethod
    def decode(cls, data: dict[str, Any]) -> Recorder:
        rec = cls(sent=data["sent"])
        rec.kinds = {k: HdrHistogram.decode(v) for k, v in data["kinds"].items()}
        rec.seconds = {int(s): HdrHistogram.decode(v) for s, v in data["seconds"].items()}
        rec.errors = Counter(data["errors"])
        rec.errors_per_second = Counter({int(k): v for k, v in data["errors_per_second"].items()})
        rec.waits = HdrHistogram.decode(data["waits"])
        return rec

    def merge(self, other: Recorder) -> None:
        _add_all(self.kinds, other.kinds)
        _add_all(self.seconds, other.seconds)
        self.errors.update(other.errors)
        self.errors_per_second.update(other.errors_per_second)
        self.sent += other.sent
        self.waits.add(other.waits)

    def total(self) -> HdrHistogram:
        h = new_hist()
        for k in self.kinds.values():
            h.add(k)
        return h


def _us(seconds: float) -> int:
    """Microseconds, clamped to what the histograms hold (and still counted at the edge)."""
    return min(max(int(seconds * 1_000_000), LOWEST_US), HIGHEST_US)


def _add_all(mine: dict[Any, HdrHistogram], theirs: dict[Any, HdrHistogram]) -> None:
    for key, h in theirs.items():
        if key in mine:
            mine[key].add(h)
        else:
            mine[key] = h
