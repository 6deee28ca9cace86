"""The suite's Markdown: targets, ratios to the peers of the same run, every run, memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tally_dev.bench.checks import median_max, median_p99
from tally_dev.bench.report import markdown_checks, markdown_runs

TARGETS = ("null", "bare", "tally", "tally-2p", "redis-always", "redis-everysec", "pg", "cluster")
NAMES = {"null": "null server (the generators' ceiling)",
         "bare": "bare lean server (granian RSGI + orjson, no storage)",
         "tally": "**Tally embedded, durable**",
         "tally-2p": "Tally embedded, durable, 2 API processes (`--workers 2`)",
         "redis-always": "lean + Redis Lua, AOF always", "redis-everysec": "lean + Redis Lua, AOF everysec",
         "pg": "lean + naive PostgreSQL (a transaction per like)",
         "cluster": "**Tally cluster, one API**"}
COLUMNS = (("uniform", "uniform likes/s"), ("viral", "viral likes/s"),
           ("feed", "feed: counts + has-liked of 50, req/s"), ("counts", "counts of 50, req/s"))


def _cell(runs: list[dict[str, Any]], target: str, preset: str,
          connections: dict[str, dict[str, int]]) -> str:
    mine = median_max(runs, target, preset)
    if not mine:
        return ""
    by_wrk = median_max(runs, target, preset, "wrk")
    p99 = median_p99(runs, target, preset)
    cell = f"{mine:,.0f} ({p99:.1f} ms)"
    if by_wrk:
        cell += f" / wrk {by_wrk:,.0f} ({median_p99(runs, target, preset, 'wrk'):.1f} ms)"
    if n := connections.get(target, {}).get(preset):
        cell += f" @{n}"
    return cell


def side_by_side_table(runs: list[dict[str, Any]],
                       connections: dict[str, dict[str, int]] | None = None) -> str:
    """Every server's closed-loop maximum per workload, the suite's generator then wrk: medians of
    the interleaved rounds, p99 of the same runs in brackets, then the connections they ran
    with."""
    rows = []
    for target in TARGETS:
        cells = [_cell(runs, target, preset, connections or {}) for preset, _ in COLUMNS]
        if any(cells):
            rows.append(f"| {NAMES[target]} | " + " | ".join(cells) + " |")
    if not rows:
        return "Nothing measured.\n"
    return ("| server | " + " | ".join(title for _, title in COLUMNS) + " |\n|---|"
            + "---:|" * len(COLUMNS) + "\n" + "\n".join(rows) + "\n")


def probe_table(runs: list[dict[str, Any]]) -> str:
    """The probes that chose each maximum's connection count: throughput at each count."""
    found: dict[tuple[str, str], dict[int, float]] = {}
    for r in runs:
        if r.get("tool") == "probe":
            cell = found.setdefault((r["target"], r["preset"]), {})
            cell[r["spec"]["connections"]] = r["throughput_per_s"]
    if not found:
        return ""
    levels = sorted({n for cell in found.values() for n in cell})
    rows = []
    for (target, preset), cell in found.items():
        best = max(cell, key=lambda n: cell[n])
        rows.append(f"| {target} | {preset} | " + " | ".join(
            ("**{:,.0f}**" if n == best else "{:,.0f}").format(cell[n]) if n in cell else ""
            for n in levels) + " |")
    return ("| server | workload | " + " | ".join(f"{n} connections, ops/s" for n in levels)
            + " |\n|---|---|" + "---:|" * len(levels) + "\n" + "\n".join(rows) + "\n")


def server_table(runs: list[dict[str, Any]]) -> str:
    """Group commit and coalescing as Tally counted them during each of its runs."""
    rows = []
    for r in runs:
        srv = r.get("server")
        if not srv or not srv.get("write_commits"):
            continue
        hot = ", ".join(f"{h['item']} ~{h['estimate']:,}" for h in srv.get("hot_items", [])[:2])
        rows.append(f"| {r['name']} | {srv['write_ops_committed']:,.0f} | {srv['write_commits']:,.0f} | "
                    f"{srv.get('ops_per_commit', 0):,.1f} | {srv.get('aggregator_events', 0):,.0f} | "
                    f"{srv.get('aggregator_keys_written', 0):,.0f} | "
                    f"{srv.get('events_per_count_write', 0):,.1f} | "
                    f"{srv.get('aggregator_lag_events_before', 0):,.0f} -> "
                    f"{srv.get('aggregator_lag_events_after', 0):,.0f} | {hot or '-'} |")
    if not rows:
        return ""
    return ("| run | ops committed | commits | ops per commit | log events applied | count writes | "
            "events per count write | aggregator lag, events (start -> end) | "
            "hottest reads (sketch) |\n|---|---:|---:|---:|---:|---:|---:|---:|---|\n"
            + "\n".join(rows) + "\n")


def cpu_table(runs: list[dict[str, Any]]) -> str:
    """Server CPU per operation, by process: the API process and its children (the SQLite
    writer), for each closed-loop run that recorded it (the first round stands for the others)."""
    rows = []
    for r in runs:
        cpu = r.get("server_cpu_us_per_op")
        if not cpu or r["mode"] != "closed" or r.get("round"):
            continue
        children = cpu.get("children", 0.0)
        others = f" (others {cpu['other_api']:,.0f})" if cpu.get("other_api") else ""
        rows.append(f"| {r['name']} | {r['throughput_per_s']:,.0f} | {cpu.get('server', 0):,.0f}"
                    f"{others} | {children:,.0f} |")
    if not rows:
        return ""
    return ("| run | ops/s | API process(es), CPU us/op | other children (writer), CPU us/op |\n"
            "|---|---:|---:|---:|\n" + "\n".join(rows) + "\n")


def memory_table(mem: dict[str, Any]) -> str:
    rows = [f"| cached hot counter (LRU entry, tracemalloc) | {mem['bytes_per_cached_counter']:.0f} B | "
            f"{mem['cache_all_items_tb']:.1f} TB if all 50 billion items were cached |"]
    for key, value in mem.items():
        if key.endswith("_bytes_per_like"):
            name = key.removesuffix("_bytes_per_like")
            rows.append(f"| like record, {name} | {value:.0f} B | "
                        f"{mem[name + '_trillion_likes_tb']:.0f} TB for 1 trillion likes |")
    return "| what | measured | projection |\n|---|---:|---|\n" + "\n".join(rows) + "\n"


def _load(result: dict[str, Any]) -> str:
    load = result.get("load_average")
    if not load:
        return ""
    return (f"Load average (1, 5, 15 min) before the suite {', '.join(f'{x:.1f}' for x in load['before'])}, "
            f"after {', '.join(f'{x:.1f}' for x in load['after'])}: above the 2 cores means other work "
            "shared the machine during the run.\n")


def write_markdown(result: dict[str, Any], path: Path) -> None:
    m = result["machine"]
    parts = [
        "# Tally benchmark results\n",
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('memory_gb', '?')} GB, "
        f"Python {m['python']}, commit {m.get('commit')}. Suite wall time {result['wall_s']:.0f} s.\n",
        _load(result),
        f"Command: `{result['command']}`\n",
        "## Targets\n", markdown_checks(result["checks"]),
        "## Side by side (maximum throughput, same run)\n",
        "Closed loop, medians over interleaved rounds (every round runs each server once per "
        "workload, so drift in the machine's background load falls on all of them alike); the "
        "suite's generator first, wrk on the same server right after; p99 in brackets; after "
        "the @, the connections both kept in flight: the count of those probed at which the "
        "server served that workload best (next table; the null server: the most probed).\n",
        side_by_side_table(result["runs"], result.get("connections")),
        "## Every run\n",
        "Open-loop latencies count from each request's intended send time. Closed-loop latencies "
        "are service times at maximum throughput. `gen wait p99` is how long an open-loop request "
        "waited in the generator for a free connection: where it nears the p99, the pool, not the "
        "server, held the requests back. `gen CPU` is the load generator's CPU use in cores.\n",
        markdown_runs(result["runs"]),
    ]
    if table := probe_table(result["runs"]):
        parts += ["## Connections: the probes behind each maximum\n",
                  "A short closed-loop run of the suite's generator at each connection count; "
                  "the maximum is then measured at the count in bold.\n", table]
    if table := server_table(result["runs"]):
        parts += ["## Group commit and coalescing, as Tally counted them\n", table]
    if table := cpu_table(result["runs"]):
        parts += ["## Server CPU per operation, by process\n", table]
    if "memory" in result:
        parts += ["## Memory\n", memory_table(result["memory"])]
    if result.get("notes"):
        parts += ["## Notes\n", "\n".join(f"- {n}" for n in result["notes"]) + "\n"]
    if result.get("plots"):
        parts += ["## Plots\n", "\n".join(f"![{p}]({p})" for p in result["plots"]) + "\n"]
    path.write_text("\n".join(parts))
