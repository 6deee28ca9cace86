"""The development commands ``tally`` offers when ``tally_dev`` is installed: cluster, bench, demo,
chaos, capacity."""

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

    from tally_dev import regions_cli
    from tally_dev.cluster import DevCluster, Layout
    from tally_dev.engines import EngineError

    if args.regions or regions_cli.is_regions(args.dir) or args.action in regions_cli.CLUSTER_VERBS:
        return regions_cli.cmd_cluster(args)
    cluster = DevCluster(Path(args.dir), Layout(partitions=args.partitions, ha=args.ha,
                                                api_workers=args.api_workers,
                                                relays=2 if args.ha else 1,
                                                synchronous=not args.async_replication))
    try:
        if args.action == "up":
            cluster.up()
            print(f"cluster up; config {cluster.config}, logs in {cluster.root}")
        elif args.action == "down":
            stopped = cluster.down()
            print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
            return 0
        elif args.action in ("kill", "restart", "wipe"):
            if not args.name:
                print(f"tally cluster {args.action} needs a NAME (see status)", file=sys.stderr)
                return 2
            getattr(cluster, args.action)(args.name)
            print(f"{args.action}: {args.name}")
            return 0
    except EngineError as exc:
        print(f"tally cluster {args.action}: {exc.message}", file=sys.stderr)
        return 2
    return print_status(cluster, args.json)


def print_status(cluster: Any, as_json: bool) -> int:
    from tally_dev.cluster import log_lag

    rows = cluster.status()
    if not rows:
        print(f"no cluster running from {cluster.root}")
        return 1
    lag = log_lag(rows)
    if as_json:
        print(orjson.dumps({"processes": rows, "event_log_lag": lag},
                           option=orjson.OPT_INDENT_2).decode())
        return 0 if all(r["ready"] for r in rows) else 1
    for row in rows:
        state = "ready" if row["ready"] else ("running" if row["running"] else "DOWN")
        detail = row.get("detail") or {}
        extra = {k: v for k, v in detail.items() if k not in ("status", "roles")}
        for key in ("lag_bytes", "leads", "state"):
            if key in row:
                extra[key] = row[key]
        print(f"{row['name']:16} {state:8} pid {row['pid'] or '-':<8} {row.get('role', ''):14} "
              f"{row['url']:44} {orjson.dumps(extra).decode() if extra else ''}")
    print(f"event log lag: {lag['outbox_rows']:.0f} outbox rows ({lag['outbox_seconds']:.2f} s), "
          f"{lag['log_messages']:.0f} log messages unapplied ({lag['log_seconds']:.2f} s)")
    return 0 if all(r["ready"] for r in rows) else 1


def cmd_capacity(args: argparse.Namespace) -> int:
    from tally_dev.capacity.cli import run

    return run(args)


def regions_cmd(args: argparse.Namespace) -> int:
    from tally_dev.regions_cli import cmd_region

    return cmd_region(args)


def register(sub: Any, add: Adder) -> None:
    """Entry point (group ``tally.commands``): add the development subcommands to ``tally``."""
    sp = add("demo", cmd_demo, "load a realistic small data set into a running service")
    sp.add_argument("--users", type=int, default=10_000)
    sp.add_argument("--items", type=int, default=1_000)
    sp.add_argument("--seed", type=int, default=7)
    sp = add("cluster", cmd_cluster, "a development cluster on loopback: PostgreSQL x2 (with --ha: each a "
             "Patroni primary + standby, etcd x3, NATS x3), Redis, 2 APIs, a relay, 2 aggregators; "
             "with --regions N, N regions each in a network namespace of its own")
    sp.add_argument("action", choices=("up", "down", "status", "kill", "restart", "wipe", "fail",
                                       "recover", "partition", "heal"))
    sp.add_argument("name", nargs="?", help="kill/restart/wipe: a process's status name; "
                    "fail/recover: a region; partition: the first region")
    sp.add_argument("other", nargs="?", help="partition: the second region")
    sp.add_argument("--ha", action="store_true", help="up: etcd, Patroni primary + standby per "
                    "database, three NATS servers (high availability inside a region)")
    sp.add_argument("--async-replication", action="store_true",
                    help="up --ha: asynchronous standbys (a failover may lose acknowledged writes)")
    sp.add_argument("--json", action="store_true", help="status as JSON")
    sp.add_argument("--dir", default="/tmp/tally-cluster", help="where data, config and logs go")
    sp.add_argument("--partitions", type=int, default=8, help="event-log partitions (up)")
    sp.add_argument("--api-workers", type=int, default=1,
                    help="up: processes of each API on its one port (on 2 cores 1 serves more; "
                         "see docs/performance.md)")
    sp.add_argument("--regions", type=int, default=0,
                    help="up: this many regions (us, eu, ap), each in its own network namespace")
    sp.add_argument("--witness", action="store_true",
                    help="up --regions: automatic failover through an etcd quorum (a member per "
                    "region, and a witness member in a namespace of its own for two regions)")
    sp.add_argument("--leaf-hub", choices=("region", "witness"), default="region",
                    help="up --regions: where the regions' NATS leaf nodes meet: the first region "
                    "(its loss cuts replication between the others) or a NATS server in the "
                    "witness place, no region (three regions or more)")
    sp = add("region", regions_cmd, "regions of a dev cluster: failover FROM --to TO, rejoin "
             "REGION (failed over while it ran), restore REGION (its users back), conflicts")
    sp.add_argument("action", choices=("failover", "rejoin", "restore", "conflicts"))
    sp.add_argument("region", nargs="?", help="failover: the failed region; rejoin, restore: "
                    "the region")
    sp.add_argument("--to", help="failover: the region that takes its users")
    sp.add_argument("--dir", default="/tmp/tally-cluster")
    from tally_dev.chaos.cli import add_parser as add_chaos

    add_chaos(add)
    from tally_dev.capacity.cli import add_arguments as add_capacity

    add_capacity(add("capacity", cmd_capacity, "the fleet, storage and bandwidth a load needs, "
                     "from per-core figures measured here"))
    from tally_dev.bench.cli import add_parser as add_bench

    add_bench(sub)
