"""``tally chaos``: start the HA dev cluster, run the scenarios one after another, write the rows.

Each scenario runs on the cluster the previous one left (every fault is repaired before the next),
and the results go to a JSON file: the figures in docs/reliability.md come from it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from tally_dev.chaos.scenarios import SCENARIOS, run
from tally_dev.cluster import DevCluster, Layout
from tally_dev.engines import EngineError

# The processes' own timings shortened for a run measured in minutes: faster lease balancing
# and aggregation windows; the engines keep their production-like durability.
CHAOS_SETTINGS = {"aggregate_window_ms": 20.0, "lease_period_ms": 200.0, "log_level": "WARNING"}


async def run_all(dev: DevCluster, names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for index, name in enumerate(names):
        started = time.monotonic()
        try:
            row = await run(dev, SCENARIOS[name], item_base=100_000 * (index + 1))
        except EngineError as exc:
            row = {"scenario": name, "error": exc.message}
        row["scenario_s"] = round(time.monotonic() - started, 1)
        print(orjson.dumps(row).decode(), flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as docs/reliability.md shows them (Markdown)."""
    out = ["| scenario | fault | acked | lost | drift | write window (s) | promoted after (s) "
           "| errors clients saw | slowest read (s) | catch-up (s) |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['scenario']} | failed: {r['error']} | | | | | | | | |")
            continue
        errors = ", ".join(f"{k} x{v}" for k, v in r["write_errors"].items()) or "none"
        out.append(f"| `{r['scenario']}` | {r['fault']} | {r['acked']} | {r['lost']} "
                   f"| {r['drift']} | {r['slowest_write_s']} | {r.get('promoted_after_s', '-')} "
                   f"| {errors} | {r['slowest_read_s']} | {r['catch_up_s']} |")
    return "\n".join(out)


def cmd_chaos(args: argparse.Namespace) -> int:
    names = args.scenario or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="tally-chaos-", dir="/tmp"))
    dev = DevCluster(root, Layout(ha=True, relays=2, synchronous=not args.async_replication),
                     settings=CHAOS_SETTINGS)
    try:
        dev.up()
        rows = asyncio.run(run_all(dev, names))
    except EngineError as exc:
        print(f"tally chaos: {exc.message}", file=sys.stderr)
        return 2
    finally:
        dev.down()
    Path(args.out).write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))
    print(table(rows))
    bad = [r["scenario"] for r in rows if r.get("error") or r.get("lost") or r.get("drift")
           or not r.get("converged")]
    print(f"{len(rows)} scenarios, results in {args.out}; "
          f"{'failed: ' + ', '.join(bad) if bad else 'no acknowledged write lost, counts converged'}")
    return 1 if bad else 0


def add_parser(add: Any) -> None:
    sp = add("chaos", cmd_chaos, "faults on the HA dev cluster under a client ledger "
             "(docs/reliability.md)")
    sp.add_argument("scenario", nargs="*", help=f"default: all of {', '.join(SCENARIOS)}")
    sp.add_argument("--dir", help="cluster directory (default: a new one under /tmp)")
    sp.add_argument("--out", default="chaos-results.json")
    sp.add_argument("--async-replication", action="store_true",
                    help="asynchronous standbys (to measure what a failover then loses)")
