"""Issue 15's targets, checked against one suite's runs: met or not, with the figures.

Maxima are the suite generator's medians over the interleaved rounds; wrk's median of the same
rounds is quoted beside each, so a reader sees whether the two generators agree.
"""

from __future__ import annotations

import statistics
from typing import Any

P99_LIKE_MS = 20.0  # embedded likes at 70% of the maximum
P99_CLUSTER_MS = 50.0
P99_FEED_MS = 10.0
P99_BULK_MS = 50.0


def _runs(runs: list[dict[str, Any]], target: str, preset: str, mode: str,
          tool: str = "loadgen") -> list[dict[str, Any]]:
    return [r for r in runs if r["target"] == target and r["preset"] == preset
            and r["mode"] == mode and r.get("tool", "loadgen") == tool]


def _open(runs: list[dict[str, Any]], target: str, preset: str) -> list[dict[str, Any]]:
    return _runs(runs, target, preset, "open")


def median_max(runs: list[dict[str, Any]], target: str, preset: str, tool: str = "loadgen") -> float:
    """The median closed-loop maximum over the interleaved rounds (a lone run where there are
    none: the bulk, the cluster), so an extra run outside the rounds changes no ratio."""
    closed = _runs(runs, target, preset, "closed", tool)
    rounds = [r for r in closed if r.get("round") is not None]
    xs = [r["throughput_per_s"] for r in rounds or closed]
    return float(statistics.median(xs)) if xs else 0.0


def median_p99(runs: list[dict[str, Any]], target: str, preset: str, tool: str = "loadgen") -> float:
    closed = _runs(runs, target, preset, "closed", tool)
    rounds = [r for r in closed if r.get("round") is not None]
    xs = [r["latency"].get("p99_ms", 0.0) for r in rounds or closed]
    return float(statistics.median(xs)) if xs else 0.0


def sustained(runs: list[dict[str, Any]], target: str, preset: str, p99_ms: float) -> float:
    """The highest offered rate served in full (>= 95%, no errors) with p99 within the bound."""
    best = 0.0
    for r in _open(runs, target, preset):
        served = r["throughput_per_s"] >= 0.95 * r["offered_per_s"] and not r["errors"]
        if served and r["latency"].get("p99_ms", 1e9) <= p99_ms:
            best = max(best, r["throughput_per_s"])
    return best


def _lowest_step(runs: list[dict[str, Any]], preset: str, size: int) -> str:
    """Where no open-loop step met the bound, what the lowest one measured: "0 likes/s" alone
    does not tell a p99 just over the bound at half the maximum from a server that cannot serve."""
    steps = _open(runs, "tally", preset)
    if not steps:
        return " (no open-loop step ran)"
    r = min(steps, key=lambda r: r["offered_per_s"])
    return (f" (the lowest step, {r['offered_per_s'] * size:,.0f} likes/s offered: "
            f"p50 {r['latency'].get('p50_ms', 0.0):.1f} ms, p99 {r['latency'].get('p99_ms', 0.0):.1f} ms, "
            f"{r['throughput_per_s'] * size:,.0f}/s served, {r['errors']} errors)")


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _both(runs: list[dict[str, Any]], target: str, preset: str) -> str:
    """'12,345/s (wrk 12,000/s)': the two generators' medians of one maximum."""
    by_wrk = median_max(runs, target, preset, "wrk")
    return f"{median_max(runs, target, preset):,.0f}/s" + (f" (wrk {by_wrk:,.0f}/s)" if by_wrk else "")


def _ratio_check(runs: list[dict[str, Any]], name: str, mine: tuple[str, str],
                 theirs: tuple[str, str], floor: float) -> dict[str, Any] | None:
    a, b = median_max(runs, *mine), median_max(runs, *theirs)
    if not a or not b:
        return None
    wa, wb = median_max(runs, *mine, tool="wrk"), median_max(runs, *theirs, tool="wrk")
    by_wrk = f"; wrk {_ratio(wa, wb):.2f}x" if wa and wb else ""
    ratio = _ratio(a, b)
    # Met only if wrk, where it measured both, confirms it: no figure rests on one tool.
    confirmed = not (wa and wb) or _ratio(wa, wb) >= floor
    return {"target": name, "measured": f"{'/'.join(mine)} {_both(runs, *mine)} vs "
                                        f"{'/'.join(theirs)} {_both(runs, *theirs)}: "
                                        f"{ratio:.2f}x{by_wrk}",
            "met": ratio >= floor and confirmed, "ratio": ratio}


def _at_70(runs: list[dict[str, Any]], target: str, preset: str, bound_ms: float) -> dict[str, Any] | None:
    """The open-loop run nearest 70% of the maximum: its p99 against the bound. The maximum is
    the closed-loop run just before, where the suite measured one outside the rounds (the feed:
    on the data the runs since the rounds have grown), else the median of the rounds."""
    lone = [r for r in _runs(runs, target, preset, "closed") if r.get("round") is None]
    top = lone[-1]["throughput_per_s"] if lone else median_max(runs, target, preset)
    steps = [r for r in _open(runs, target, preset) if top]
    if not steps:
        return None
    r = min(steps, key=lambda r: abs(r["offered_per_s"] - 0.7 * top))
    p99 = r["latency"].get("p99_ms", 1e9)
    served = r["throughput_per_s"] >= 0.95 * r["offered_per_s"] and not r["errors"]
    return {"target": f"{target} {preset}: p99 <= {bound_ms:g} ms at 70% of its maximum",
            "measured": f"p99 {p99:.1f} ms at {r['offered_per_s']:,.0f}/s offered "
                        f"({r['offered_per_s'] / top:.0%} of {top:,.0f}/s), "
                        f"{r['throughput_per_s']:,.0f}/s served",
            "met": p99 <= bound_ms and served, "ratio": p99}


def checks(runs: list[dict[str, Any]], extra: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any] | None] = [
        _ratio_check(runs, f"{preset} likes: Tally embedded >= 1.5x Redis Lua, AOF always",
                     ("tally", preset), ("redis-always", preset), 1.5)
        for preset in ("uniform", "viral")]
    found += [_at_70(runs, "tally", preset, P99_LIKE_MS) for preset in ("uniform", "viral")]
    found.append(_ratio_check(runs, "Tally /v1/like >= 50% of the bare lean server's",
                              ("tally", "uniform"), ("bare", "uniform"), 0.5))
    found.append(_ratio_check(runs, "feed (counts + has-liked of 50) >= 1.0x Redis MGET of the counts",
                              ("tally", "feed"), ("redis-always", "counts"), 1.0))
    # Reads scale with API processes (``tally serve --workers N``): the same target for the
    # configuration a read-heavy deployment runs, beside the one-process figure, not instead.
    found.append(_ratio_check(runs, "feed >= 1.0x Redis MGET of the counts, Tally with 2 API "
                                    "processes", ("tally-2p", "feed"), ("redis-always", "counts"),
                              1.0))
    found.append(_at_70(runs, "tally", "feed", P99_FEED_MS))
    found.append(_ratio_check(runs, "cluster uniform likes >= 1.0x naive PostgreSQL",
                              ("cluster", "uniform"), ("pg", "uniform"), 1.0))
    found.append(_ratio_check(runs, "cluster viral likes >= 3x naive PostgreSQL",
                              ("cluster", "viral"), ("pg", "viral"), 3.0))
    found.append(_at_70(runs, "cluster", "uniform", P99_CLUSTER_MS))
    out = [c for c in found if c is not None]
    bulk = _runs(runs, "tally", "bulk", "closed")
    pg_viral = median_max(runs, "pg", "viral")
    if bulk and pg_viral:
        size = bulk[0]["spec"]["params"]["bulk_size"]
        likes = sustained(runs, "tally", "bulk", P99_BULK_MS) * size
        ratio = _ratio(likes, pg_viral)
        out.append({"target": "viral via /v1/bulk (batching client): Tally >= 10x naive PostgreSQL",
                    "measured": f"Tally sustains {likes:,.0f} likes/s at p99 <= 50 ms in requests "
                                f"of {size}{_lowest_step(runs, 'bulk', size) if not likes else ''}; "
                                f"PostgreSQL viral {pg_viral:,.0f}/s: {ratio:.1f}x",
                    "met": ratio >= 10, "ratio": ratio})
    mem = extra.get("memory")
    if mem:
        out.append({"target": "memory: bytes per cached counter and per like record, projected",
                    "measured": f"{mem['bytes_per_cached_counter']:.0f} B/cached counter; "
                                + "; ".join(f"{k.removesuffix('_bytes_per_like')} "
                                            f"{v:.0f} B/like"
                                            for k, v in mem.items() if k.endswith("_bytes_per_like")),
                    "met": True, "ratio": None})
    return out
