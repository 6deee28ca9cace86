"""The issue's targets, checked against one suite's runs: met or not, with the figures."""

from __future__ import annotations

import statistics
from typing import Any

P99_LIKE_MS = 50.0
P99_FEED_MS = 10.0


def _runs(runs: list[dict[str, Any]], target: str, preset: str, mode: str
          ) -> list[dict[str, Any]]:
    return [r for r in runs if r["target"] == target and r["preset"] == preset
            and r["mode"] == mode]


def _open(runs: list[dict[str, Any]], target: str, preset: str) -> list[dict[str, Any]]:
    return _runs(runs, target, preset, "open")


def _closed(runs: list[dict[str, Any]], target: str, preset: str) -> dict[str, Any] | None:
    """The closed-loop run of the median throughput (over the interleaved rounds)."""
    found = sorted(_runs(runs, target, preset, "closed"), key=lambda r: r["throughput_per_s"])
    return found[(len(found) - 1) // 2] if found else None


def median_max(runs: list[dict[str, Any]], target: str, preset: str) -> float:
    """The median closed-loop maximum over the interleaved rounds (a lone run where there are
    none: the bulk, the cluster), so an extra run outside the rounds changes no ratio."""
    closed = _runs(runs, target, preset, "closed")
    rounds = [r for r in closed if r.get("round") is not None]
    xs = [r["throughput_per_s"] for r in rounds or closed]
    return float(statistics.median(xs)) if xs else 0.0


def sustained(runs: list[dict[str, Any]], target: str, preset: str, p99_ms: float) -> float:
    """The highest offered rate served in full (>= 95%, no errors) with p99 within the bound.

    Any step counts, not only one whose lower steps all held: requiring that made a suite quote
    0 likes/s for the one-like viral sweep because one second of its lowest step stalled
    (p99 167 ms in its last second; the three steps above it held). Every step is in the
    results' table of runs, failed ones included."""
    best = 0.0
    for r in _open(runs, target, preset):
        served = r["throughput_per_s"] >= 0.95 * r["offered_per_s"] and not r["errors"]
        if served and r["latency"].get("p99_ms", 1e9) <= p99_ms:
            best = max(best, r["throughput_per_s"])
    return best


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def checks(runs: list[dict[str, Any]], extra: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    pg = _closed(runs, "pg", "viral")
    tally_viral = sustained(runs, "tally", "viral", P99_LIKE_MS)
    if pg is not None:
        pg_max = median_max(runs, "pg", "viral")
        ratio = _ratio(tally_viral, pg_max)
        out.append({"target": "viral, equal durability: Tally >= 10x naive PostgreSQL, like p99 <= 50 ms",
                    "measured": f"Tally sustains {tally_viral:,.0f} likes/s at p99 <= 50 ms (open "
                                f"loop); PostgreSQL max {pg_max:,.0f}/s "
                                f"(closed loop, median): {ratio:.1f}x", "met": ratio >= 10,
                    "ratio": ratio})
    bulk = _closed(runs, "tally", "bulk")
    if bulk is not None and pg is not None:
        size = bulk["spec"]["params"]["bulk_size"]
        likes = sustained(runs, "tally", "bulk", P99_LIKE_MS) * size
        ratio = _ratio(likes, median_max(runs, "pg", "viral"))
        out.append({"target": "viral via /v1/bulk (batching client): Tally >= 10x PostgreSQL, "
                              "p99 <= 50 ms",
                    "measured": f"Tally sustains {likes:,.0f} likes/s at p99 <= 50 ms per request of "
                                f"{size} (open loop; closed-loop max "
                                f"{bulk['throughput_per_s'] * size:,.0f}/s): {ratio:.1f}x",
                    "met": ratio >= 10, "ratio": ratio})
    noop = _closed(runs, "tally", "noop")
    for preset in ("uniform", "zipf"):
        run = _closed(runs, "tally", preset)
        if run is not None and noop is not None:
            mine, ceiling = median_max(runs, "tally", preset), median_max(runs, "tally", "noop")
            ratio = _ratio(mine, ceiling)
            out.append({"target": f"{preset}: Tally likes/s >= 70% of /bench/noop",
                        "measured": f"{mine:,.0f} vs {ceiling:,.0f}/s (medians of interleaved "
                                    f"rounds): {ratio:.0%}", "met": ratio >= 0.7, "ratio": ratio})
    feed = _open(runs, "tally", "feed")
    if feed:
        p99 = feed[-1]["latency"].get("p99_ms", 1e9)
        closed = [r for r in _runs(runs, "tally", "feed", "closed") if r.get("round") is None]
        top = f" (70% of {closed[-1]['throughput_per_s']:,.0f}/s, the maximum just before)" \
            if closed else ""
        out.append({"target": "feed reads: p99 <= 10 ms at 70% of max throughput",
                    "measured": f"p99 {p99:.1f} ms at {feed[-1]['offered_per_s']:,.0f}/s offered"
                                + top,
                    "met": p99 <= P99_FEED_MS and not feed[-1]["errors"], "ratio": p99})
    mem = extra.get("memory")
    if mem:
        out.append({"target": "memory: bytes per cached counter and per like record, projected",
                    "measured": f"{mem['bytes_per_cached_counter']:.0f} B/cached counter; "
                                + "; ".join(f"{k.removesuffix('_bytes_per_like')} "
                                            f"{v:.0f} B/like"
                                            for k, v in mem.items() if k.endswith("_bytes_per_like")),
                    "met": True, "ratio": None})
    return out
