"""The development commands ``tally`` offers when ``tally_dev`` is installed: cluster, bench, demo."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import Any

import orjson

Adder = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def cmd_demo(args: argparse.Namespace) -> int:
    from tally_dev.demo import DemoPlan, run_demo

    plan = DemoPlan(users=args.users, items=args.items, seed=args.seed)
    result = asyncio.run(run_demo(args.url, plan))
    return 1 if result["mismatched"] else 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tally_dev.cluster import DevCluster, Layout, log_lag
    from tally_dev.engines import EngineError

    cluster = DevCluster(Path(args.dir), Layout(partitions=args.partitions))
    try:
        if args.action == "up":
            cluster.up()
            print(f"cluster up; config {cluster.config}, logs in {cluster.root}")
        elif args.action == "down":
            stopped = cluster.down()
            print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
            return 0
    except EngineError as exc:
        print(f"tally cluster {args.action}: {exc.message}", file=sys.stderr)
        return 2
    rows = cluster.status()
    if not rows:
        print(f"no cluster running from {cluster.root}")
        return 1
    for row in rows:
        state = "ready" if row["ready"] else ("running" if row["running"] else "DOWN")
        detail = row.get("detail") or {}
        extra = {k: v for k, v in detail.items() if k not in ("status", "roles")}
        print(f"{row['name']:14} {state:8} pid {row['pid']:<8} {row['url']:40} "
              f"{orjson.dumps(extra).decode() if extra else ''}")
    lag = log_lag(rows)
    print(f"event log lag: {lag['outbox_rows']:.0f} outbox rows ({lag['outbox_seconds']:.2f} s), "
          f"{lag['log_messages']:.0f} log messages unapplied ({lag['log_seconds']:.2f} s)")
    return 0 if all(r["ready"] for r in rows) else 1


def register(sub: Any, add: Adder) -> None:
    """Entry point (group ``tally.commands``): add the development subcommands to ``tally``."""
    sp = add("demo", cmd_demo, "load a realistic small data set into a running service")
    sp.add_argument("--users", type=int, default=10_000)
    sp.add_argument("--items", type=int, default=1_000)
    sp.add_argument("--seed", type=int, default=7)
    sp = add("cluster", cmd_cluster, "a development cluster on loopback: PostgreSQL x2, NATS, Redis, "
             "2 APIs, a relay, 2 aggregators")
    sp.add_argument("action", choices=("up", "down", "status"))
    sp.add_argument("--dir", default="/tmp/tally-cluster", help="where data, config and logs go")
    sp.add_argument("--partitions", type=int, default=8, help="event-log partitions (up)")
    from tally_dev.bench.cli import add_parser as add_bench

    add_bench(sub)
