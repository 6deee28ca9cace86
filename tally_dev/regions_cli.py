"""The region verbs of ``tally cluster`` and ``tally region``, on a ``RegionCluster``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import orjson

from tally_dev.engines import EngineError
from tally_dev.regions import RegionCluster

CLUSTER_VERBS = ("fail", "recover", "partition", "heal")


def is_regions(directory: str) -> bool:
    return (Path(directory) / "regions.json").exists()


def cmd_cluster(args: argparse.Namespace) -> int:
    rc = RegionCluster(Path(args.dir), partitions=args.partitions)
    try:
        if args.action == "up":
            rc.up(args.regions, witness=args.witness, hub=args.leaf_hub)
            print(f"{args.regions} regions up; configs {rc.root}/<region>/tally.toml")
        elif args.action == "down":
            print(f"stopped: {', '.join(rc.down()) or 'nothing was running'}")
            return 0
        elif args.action == "fail":
            print(f"killed: {', '.join(rc.fail(_one(args)))}")
        elif args.action == "recover":
            report = rc.recover(_one(args))
            print(f"recovered {args.name}: {report.late} late changes, {report.applied} "
                  f"applied at the survivor, {report.agreed} agreed, {len(report.conflicts)} "
                  "conflicts (`tally region conflicts`)")
        elif args.action == "partition":
            if not (args.name and args.other):
                raise EngineError("partition takes two regions")
            rc.partition(args.name, args.other)
        elif args.action == "heal":
            rc.heal()
    except EngineError as exc:
        print(f"tally cluster {args.action}: {exc}", file=sys.stderr)
        return 2
    status = rc.status()
    status["lag"] = rc.lag()
    if getattr(args, "json", False):
        print(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode())
    else:
        _print_status(status)
    return 0 if all(r["ready"] for r in status["regions"].values()) else 1


def _one(args: argparse.Namespace) -> str:
    if not args.name or args.other:
        raise EngineError(f"{args.action} takes one region")
    return str(args.name)


def _print_status(status: dict[str, object]) -> None:
    regions = status["regions"]
    lag = status["lag"]
    assert isinstance(regions, dict) and isinstance(lag, dict)
    for name, r in regions.items():
        print(f"region {name}: {'ready' if r['ready'] else 'NOT READY'}, api {r['api']}, "
              f"placement epoch {r['placement_epoch']}, outbox backlog {r['outbox_backlog']}, "
              f"log pending {r['log_pending_messages']}, missing from peers {lag.get(name)}")
        for p in r["processes"]:
            print(f"  {p['name']:14} {'running' if p['running'] else 'DOWN':8} pid {p['pid']:<8} "
                  f"{p['url']}")
    witness = status.get("witness")
    if isinstance(witness, list) and witness:
        print(f"witness place (leaf-node hub: {status.get('leaf_hub')}):")
        for p in witness:
            print(f"  {p['name']:14} {'running' if p['running'] else 'DOWN':8} pid {p['pid']:<8} "
                  f"{p['url']}")
    print(f"cut: {status['cut'] or 'none'}")


def cmd_region(args: argparse.Namespace) -> int:
    from tally import regions_admin
    from tally.settings import load

    rc = RegionCluster(Path(args.dir))
    try:
        if args.action == "failover":
            if not args.to:
                raise EngineError("failover needs --to REGION")
            print(f"placement epoch {rc.failover(args.region, args.to)}: {args.region}'s users "
                  f"now write at {args.to}")
        elif args.action == "restore":
            print(f"placement epoch {rc.restore(args.region)}: {args.region}'s users write "
                  "there again")
        elif args.action == "rejoin":
            report = rc.rejoin(args.region)
            print(f"rejoined {args.region}: {report.late} late changes, {report.applied} "
                  f"applied, {report.agreed} agreed, {len(report.conflicts)} conflicts")
        else:
            for region in rc.regions:
                for c in asyncio.run(regions_admin.conflicts(load(rc.config(region)))):
                    print(orjson.dumps({"listed_in": region, **c.__dict__}).decode())
    except EngineError as exc:
        print(f"tally region {args.action}: {exc}", file=sys.stderr)
        return 2
    return 0
