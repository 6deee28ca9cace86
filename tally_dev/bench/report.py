"""Results as data: the JSON of one run, the suite's result file and its Markdown table."""

from __future__ import annotations

import platform
import subprocess
from typing import Any

from tally_dev.bench.hist import summary
from tally_dev.bench.loadgen import RunResult


def run_dict(r: RunResult) -> dict[str, Any]:
    """Everything a reader needs about one run; throughput counts only the measured window."""
    spec, rec = r.spec, r.recorder
    window = range(0, max(int(spec.duration_s), 1))
    ok = sum(rec.seconds[s].get_total_count() for s in window if s in rec.seconds)
    errors = sum(rec.errors.values())
    series = []
    for s in window:
        h = rec.seconds.get(s)
        row: dict[str, float] = {"t": float(s), "ok": float(h.get_total_count() if h else 0),
                                 "errors": float(rec.errors_per_second.get(s, 0))}
        if h is not None and h.get_total_count():
            row.update(p50_ms=h.get_value_at_percentile(50) / 1000,
                       p99_ms=h.get_value_at_percentile(99) / 1000, max_ms=h.get_max_value() / 1000)
        series.append(row)
    gen_cpu = sum(r.cpu_s) / max(spec.warmup_s + spec.duration_s, 1e-9)
    return {
        "name": spec.name, "preset": spec.preset, "mode": spec.mode,
        "offered_per_s": spec.rate if spec.mode == "open" else None,
        "throughput_per_s": ok / spec.duration_s,
        "ok": ok, "errors": errors, "error_reasons": dict(rec.errors),
        "latency": summary(rec.total()),
        "latency_by_kind": {k: summary(h) for k, h in sorted(rec.kinds.items())},
        "series": series,
        "generator_wait": summary(rec.waits) if spec.mode == "open" else None,
        "generator_cpu_cores": round(gen_cpu, 3),
        "spec": {"duration_s": spec.duration_s, "warmup_s": spec.warmup_s,
                 "connections": spec.connections, "workers": spec.workers, "seed": spec.seed,
                 "rate": spec.rate, "timeout_s": spec.timeout_s,
                 "params": {k: getattr(spec.params, k) for k in spec.params.__dataclass_fields__}},
    }


def machine() -> dict[str, Any]:
    """The machine a result came from, so numbers are never quoted without it."""
    info: dict[str, Any] = {"python": platform.python_version(), "system": platform.platform()}
    try:
        with open("/proc/cpuinfo") as fh:
            models = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        info["cpu"] = models[0] if models else platform.processor()
        info["cores"] = len(models)
        with open("/proc/meminfo") as fh:
            info["memory_gb"] = round(int(fh.readline().split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True, timeout=5).stdout.strip() or None
    except OSError:
        info["commit"] = None
    return info


def _ms(lat: dict[str, float], key: str) -> str:
    return f"{lat[key]:.1f}" if key in lat else "-"


def _cores(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"  # wrk's runs: not measured


def markdown_runs(runs: list[dict[str, Any]]) -> str:
    head = ("| run | mode | offered/s | ok/s | errors | p50 ms | p99 ms | p99.9 ms | max ms | "
            "gen wait p99 ms | gen CPU |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    rows = []
    for r in runs:
        lat = r["latency"]
        offered = f"{r['offered_per_s']:,.0f}" if r["offered_per_s"] else "max"
        wait = _ms(r["generator_wait"], "p99_ms") if r.get("generator_wait") else "-"
        rows.append(f"| {r['name']} | {r['mode']} | {offered} | {r['throughput_per_s']:,.0f} | "
                    f"{r['errors']:,} | {_ms(lat, 'p50_ms')} | {_ms(lat, 'p99_ms')} | "
                    f"{_ms(lat, 'p99.9_ms')} | {_ms(lat, 'max_ms')} | {wait} | "
                    f"{_cores(r['generator_cpu_cores'])} |")
    return head + "\n".join(rows) + "\n"


def markdown_checks(checks: list[dict[str, Any]]) -> str:
    head = "| target | measured | met |\n|---|---|---|\n"
    rows = [f"| {c['target']} | {c['measured']} | {'yes' if c['met'] else 'no'} |" for c in checks]
    return head + "\n".join(rows) + "\n"
