"""CPU per request of Tally's server variants, side by side: the A/B harness behind the hot-path
figures of docs/performance.md.

``tally bench cpu --variants uvicorn,granian --presets uniform,feed --rounds 3`` starts every
variant at once on fresh data, then in each round drives each (variant, workload) with wrk for a
few seconds, in turn, and reads from /proc the CPU seconds every process of the variant spent: the
API processes (those listening on its port) apart from the others (the SQLite likes writer). CPU
per request moves far less than throughput on a shared machine (a crowded run queue delays a
request but does not make it cost more instructions), so it is the figure to compare; the
throughput and p99 of the same runs are reported beside it. Rounds interleave the variants, so a
change in the machine's load falls on all of them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tally_dev.bench import cpu, server_stats, targets, wrk
from tally_dev.bench.workloads import Params

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Variant:
    """How to run Tally: ``tally serve`` with settings, or another ASGI server on its app."""

    name: str
    settings: dict[str, str] = field(default_factory=dict)
    argv: tuple[str, ...] = ()  # empty: ``tally serve``


VARIANTS = {
    "uvicorn": Variant("uvicorn"),
    "uvicorn-2p": Variant("uvicorn-2p", {"workers": "2"}),
    "granian": Variant("granian", argv=(
        sys.executable, "-m", "granian", "--interface", "asgi", "--factory", "--loop", "uvloop",
        "--workers", "1", "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning",
        "tally.api.app:create_app_from_env")),
}


def _descendants(root: int) -> list[int]:
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(cpu.children(pid))
    return out


def _own_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def cpu_split(root: int, port: int) -> dict[str, float]:
    """CPU seconds so far of the API processes (listening on ``port``, or the root) and of the
    server's other processes (its SQLite writer)."""
    api = set(cpu.listening(port)) | {root}
    out = {"api": 0.0, "other": 0.0}
    for pid in _descendants(root):
        out["api" if pid in api else "other"] += _own_ticks(pid) / _TICK
    return out


@contextlib.contextmanager
def started(variant: Variant, work: Path) -> Iterator[targets.HttpServer]:
    if not variant.argv:
        with targets.tally_server(work, variant.name, **variant.settings) as server:
            yield server
        return
    env = {"TALLY_DATA_DIR": str(work / variant.name / "data"), "TALLY_LOG_LEVEL": "WARNING",
           **{f"TALLY_{k.upper()}": v for k, v in variant.settings.items()}}
    server = targets.HttpServer(variant.name, list(variant.argv), work / variant.name, env,
                                ready_path="/readyz")
    with server:
        yield server


def from_tree(source: Path) -> Variant:
    """``tally serve`` from another source tree (a git worktree of the commit before a change),
    on this environment's interpreter and packages: the "before" of a before/after."""
    return Variant(f"base:{source.name}", argv=(
        "env", f"PYTHONPATH={source.resolve()}", sys.executable, "-m", "tally.cli", "serve",
        "--port", "{port}"))


def run(variants: list[str], presets: list[str], rounds: int = 3, duration_s: float = 5.0,
        connections: int = 32, out: Path | None = None, base: Path | None = None,
        together: bool = False) -> dict[str, Any]:
    """``together``: in each (round, workload) every variant is driven at the same time, each by
    its own wrk, so a change in the machine's load during the run falls on all of them (on a
    shared machine it moves from one 5 s run to the next far more than most changes do); each
    then gets part of the cores, which raises CPU per request alike for all."""
    work = Path(tempfile.mkdtemp(prefix="tally-cpu-"))
    runs: list[dict[str, Any]] = []
    chosen = ([from_tree(base)] if base else []) + [VARIANTS[name] for name in variants]
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)  # last out: after every server stopped
        servers = {v.name: stack.enter_context(started(v, work)) for v in chosen}
        for rnd in range(rounds):
            for preset in presets:
                batches = [list(servers.items())] if together else [[x] for x in servers.items()]
                for batch in batches:
                    for row in _measure(batch, preset, rnd, duration_s, connections):
                        runs.append(row)
                        print(f"  r{rnd + 1} {row['variant']:<12} {preset:<8} "
                              f"{row['per_s']:>8,.0f}/s p99 {row['p99_ms']:6.1f} ms  API "
                              f"{row['api_us']:6.0f} us/req  writer {row['other_us']:5.0f} "
                              f"us/req  errors {row['errors']}", file=sys.stderr)
    md = table(runs)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "cpu.json").write_bytes(orjson.dumps({"runs": runs}, option=orjson.OPT_INDENT_2))
        (out / "cpu.md").write_text(md)
    return {"runs": runs, "table": md}


def _measure(batch: list[tuple[str, targets.HttpServer]], preset: str, rnd: int,
             duration_s: float, connections: int) -> list[dict[str, Any]]:
    """One wrk run per server of ``batch``, all at once, and each server's CPU over its run."""
    before = {}
    for _name, server in batch:
        server_stats.settle(server.url)
    for name, server in batch:
        assert server.proc is not None
        before[name] = cpu_split(server.proc.pid, server.port)
    with ThreadPoolExecutor(len(batch)) as pool:
        results = list(pool.map(lambda item: wrk.run(f"{item[0]}/{preset}", item[1].url, preset,
                                                     duration_s, connections, Params()), batch))
    rows = []
    for (name, server), r in zip(batch, results, strict=True):
        assert server.proc is not None
        after = cpu_split(server.proc.pid, server.port)
        n = max(r["ok"], 1)
        rows.append({"variant": name, "preset": preset, "round": rnd,
                     "per_s": r["throughput_per_s"], "p99_ms": r["latency"]["p99_ms"],
                     "errors": r["errors"],
                     "api_us": (after["api"] - before[name]["api"]) / n * 1e6,
                     "other_us": (after["other"] - before[name]["other"]) / n * 1e6})
    return rows


def table(runs: list[dict[str, Any]]) -> str:
    """Medians over the rounds, per (workload, variant)."""
    lines = ["| workload | variant | requests/s | p99 ms | API CPU us/request | "
             "writer CPU us/request |", "|---|---|---:|---:|---:|---:|"]
    keys = dict.fromkeys((r["preset"], r["variant"]) for r in runs)
    for preset, variant in keys:
        mine = [r for r in runs if r["preset"] == preset and r["variant"] == variant]

        def med(k: str, rows: list[dict[str, Any]] = mine) -> float:
            return float(statistics.median(r[k] for r in rows))

        lines.append(f"| {preset} | {variant} | {med('per_s'):,.0f} | {med('p99_ms'):.1f} | "
                     f"{med('api_us'):.0f} | {med('other_us'):.0f} |")
    return "\n".join(lines) + "\n"
