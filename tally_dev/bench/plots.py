"""PNG plots of a suite: latency percentiles and throughput over time, latency vs offered load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

DPI = 80


def _timeseries(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    fig, (lat, thr) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    for r in runs:
        t = [row["t"] for row in r["series"] if "p99_ms" in row]
        lat.plot(t, [row["p99_ms"] for row in r["series"] if "p99_ms" in row], label=f"{r['name']} p99")
        lat.plot(t, [row["p50_ms"] for row in r["series"] if "p50_ms" in row], linestyle=":",
                 color=lat.lines[-1].get_color(), label=f"{r['name']} p50")
        thr.plot([row["t"] for row in r["series"]], [row["ok"] for row in r["series"]],
                 label=r["name"])
    lat.set_yscale("log")
    lat.set_ylabel("latency ms (log)")
    lat.legend(fontsize=7, ncol=2)
    thr.set_ylabel("ops / s")
    thr.set_xlabel("seconds")
    thr.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _vs_load(runs: list[dict[str, Any]], path: Path) -> bool:
    sweeps: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if r["mode"] == "open":
            sweeps.setdefault(f"{r['target']}/{r['preset']}", []).append(r)
    if not sweeps:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rs in sweeps.items():
        rs.sort(key=lambda r: r["offered_per_s"])
        per_op = rs[0]["spec"]["params"]["bulk_size"] if rs[0]["preset"] == "bulk" else 1
        x = [r["offered_per_s"] * per_op for r in rs]
        ax.plot(x, [r["latency"].get("p99_ms", 0) for r in rs], marker="o", label=f"{name} p99")
        ax.plot(x, [r["latency"].get("p50_ms", 0) for r in rs], marker=".", linestyle=":",
                color=ax.lines[-1].get_color(), label=f"{name} p50")
    ax.set_xlabel("offered load, ops / s (open loop; bulk: likes / s)")
    ax.set_ylabel("latency ms (log)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Latency vs offered load")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def _side_by_side(runs: list[dict[str, Any]], path: Path) -> bool:
    """Bars: each server's median maximum per workload, the suite's generator beside wrk."""
    from tally_dev.bench.checks import median_max
    from tally_dev.bench.summary import COLUMNS, TARGETS

    presets = [p for p, _ in COLUMNS]
    targets = [t for t in TARGETS if any(median_max(runs, t, p) for p in presets)]
    if not targets:
        return False
    fig, axes = plt.subplots(1, len(presets), figsize=(12, 4.5))
    for ax, preset in zip(axes, presets, strict=True):
        ys = range(len(targets))
        ax.barh([y + 0.2 for y in ys], [median_max(runs, t, preset) for t in targets], 0.4,
                label="suite generator")
        ax.barh([y - 0.2 for y in ys], [median_max(runs, t, preset, "wrk") for t in targets], 0.4,
                label="wrk")
        ax.set_yticks(list(ys), targets if ax is axes[0] else [""] * len(targets), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(preset, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    axes[0].legend(fontsize=7)
    fig.suptitle("Maximum throughput, ops/s (closed loop, medians of interleaved rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def plot_all(result: dict[str, Any], out: Path) -> list[str]:
    """Writes the PNGs into ``out``; returns their file names."""
    runs = result["runs"]
    made = ["side-by-side.png"] if _side_by_side(runs, out / "side-by-side.png") else []
    by_preset: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        # the first round stands for the others; wrk's runs have no per-second series
        if r["mode"] == "closed" and not r.get("round") and r.get("tool", "loadgen") == "loadgen":
            by_preset.setdefault(r["preset"], []).append(r)
    for preset, rs in by_preset.items():
        name = f"timeseries-{preset}.png"
        _timeseries(rs, out / name, f"{preset}: maximum throughput (closed loop)")
        made.append(name)
    opens = [r for r in runs if r["mode"] == "open"]
    if opens:
        _timeseries(opens, out / "timeseries-open.png", "open loop (fixed arrival rate)")
        made.append("timeseries-open.png")
    if _vs_load(runs, out / "latency-vs-load.png"):
        made.append("latency-vs-load.png")
    return made
