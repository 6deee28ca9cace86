"""What Tally itself reports around a run: group commits, coalescing, cache and hot items.

The suite reads ``/metrics`` before and after each Tally run and keeps the differences, so each
result shows how many likes shared one commit (one fsync) and how many change-log events one
count write absorbed, measured on the very workload the run drove.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

COUNTERS = ("tally_write_commits_total", "tally_write_ops_committed_total", "tally_write_syncs_total",
            "tally_aggregator_events_total", "tally_aggregator_keys_written_total",
            "tally_aggregator_batches_total", "tally_cache_coalesced_misses_total")
GAUGES = ("tally_aggregator_lag_events", "tally_aggregator_lag_seconds")
# Full garbage collections stop the whole process: how many a run saw, and for how long in all.
LABELLED = {'tally_gc_pause_seconds_count{generation="2"}': "gc_full_collections",
            'tally_gc_pause_seconds_sum{generation="2"}': "gc_full_pause_s"}


def scrape(url: str, attempts: int = 20) -> dict[str, float]:
    """The counters above, from the Prometheus text; empty if the server does not answer. With
    several API processes on the port, only the first runs the aggregator: each attempt is a
    new connection (the kernel picks the process) until one reports the aggregator's lag."""
    out: dict[str, float] = {}
    for _ in range(attempts):
        out = _scrape_once(url)
        if not out or GAUGES[0] in out:
            break
    return out


def _scrape_once(url: str) -> dict[str, float]:
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in COUNTERS or name in GAUGES or name in LABELLED:
            out[name] = float(value)
    return out


def settle(url: str, timeout_s: float = 20.0, poll_s: float = 0.1) -> float:
    """Waits until the aggregator has applied every logged event (or ``timeout_s`` passed) and
    returns the seconds waited. Each run then measures its own workload on a caught-up server,
    not the backlog of the one before it (a feed run that followed the increments spent its
    first second behind their counting)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if scrape(url).get("tally_aggregator_lag_events", 0.0) <= 0:
            break
        time.sleep(poll_s)
    return round(time.monotonic() - start, 3)


def hot_items(url: str, n: int = 3) -> list[dict[str, Any]]:
    try:
        items: list[dict[str, Any]] = httpx.get(f"{url}/v1/admin/hot", timeout=10).json()["items"]
    except (httpx.HTTPError, ValueError, KeyError):
        return []
    return items[:n]


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per-run figures: the counters' growth and the two ratios the hot-key machinery promises."""
    d = {k.removeprefix("tally_").removesuffix("_total"): after[k] - before.get(k, 0.0)
         for k in after if k in COUNTERS}
    for k, name in LABELLED.items():
        if k in after:
            d[name] = round(after[k] - before.get(k, 0.0), 4)
    for k in GAUGES:  # levels, not growth: how far behind the aggregator was at each end
        if k in after:
            name = k.removeprefix("tally_")
            d[f"{name}_before"], d[f"{name}_after"] = before.get(k, 0.0), after[k]
    if d.get("write_commits"):
        d["ops_per_commit"] = round(d["write_ops_committed"] / d["write_commits"], 1)
    if d.get("write_syncs"):  # the likes writer's pipelined fsyncs: commits each one covered
        d["commits_per_sync"] = round(d["write_commits"] / d["write_syncs"], 2)
    if d.get("aggregator_keys_written"):
        d["events_per_count_write"] = round(d["aggregator_events"] / d["aggregator_keys_written"], 1)
    return d
