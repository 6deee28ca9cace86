"""The ``tally`` command: serve, write, read, reconcile and demo against a running service."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import orjson

from tally import settings as settings_mod
from tally.client import Tally, TallyAPIError
from tally.core.errors import ConfigError

DEFAULT_URL = "http://127.0.0.1:8080"


_DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)")


def _id(raw: str) -> int | str:
    """Ids on the command line: a canonical decimal is an int64, anything else a string id.

    Not ``int(raw)``: it would also take '1_000', '007', '+5' or ' 5', which name other ids.
    """
    return int(raw) if _DECIMAL.fullmatch(raw) else raw


def _item(raw: str) -> tuple[str, int | str]:
    item_type, sep, item_id = raw.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"item must be TYPE:ID, got {raw!r}")
    return item_type, _id(item_id)


def _print(data: Any) -> None:
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tally import logs
    from tally.api.app import create_app

    s = settings_mod.load(args.config)
    if args.port is not None or args.host is not None:
        s = s.replace(port=args.port or s.port, host=args.host or s.host)
    if args.role is not None:
        s = s.replace(role=args.role)
        os.environ["TALLY_ROLE"] = args.role  # for uvicorn's worker processes, when workers > 1
    logs.setup(s.log_level)
    common: dict[str, Any] = {"host": s.host, "port": s.port, "loop": "uvloop", "http": "httptools",
                              "log_config": None, "access_log": s.access_log,
                              "timeout_graceful_shutdown": 10}
    if s.workers > 1:  # each worker process builds its app from the same file and environment
        if args.config:
            os.environ["TALLY_CONFIG"] = args.config
        uvicorn.run("tally.api.app:create_app_from_env", factory=True, workers=s.workers, **common)
    else:
        uvicorn.run(create_app(s, owns_process=True), **common)
    return 0


def cmd_toggle(args: argparse.Namespace) -> int:
    with Tally(args.url) as c:
        r = c.set(_id(args.user), args.item[0], args.item[1], args.counter, args.on)
    _print({"state": r.state, "changed": r.changed, "count": r.count})
    return 0


def cmd_incr(args: argparse.Namespace) -> int:
    with Tally(args.url) as c:
        r = c.incr(args.counter, args.item[0], args.item[1], args.n, args.key)
    _print({"applied": r.applied, "count": r.count})
    return 0


def cmd_count(args: argparse.Namespace) -> int:
    with Tally(args.url) as c:
        counts = c.counts(args.items, args.counter or None)
    _print([{"item": f"{t}:{i}", "counts": n} for (t, i), n in zip(args.items, counts,
                                                                  strict=True)])
    return 0


def cmd_has(args: argparse.Namespace) -> int:
    with Tally(args.url) as c:
        flags = c.has(_id(args.user), args.items, args.counter)
    _print({f"{t}:{i}": f for (t, i), f in zip(args.items, flags, strict=True)})
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    drifts = 0
    checked = 0
    with Tally(args.url) as c:
        for line in c.reconcile_stream(args.items or None, repair=not args.dry_run):
            checked = line["checked"]
            for d in line["drifts"]:
                drifts += 1
                print(f"drift {d['counter']} {d['item']}: stored {d['stored']}, "
                      f"recount {d['actual']}")
            print(f"\rchecked {checked:,} counts, {drifts:,} drifted", end="", file=sys.stderr)
    print(file=sys.stderr)
    verb = "found (dry run, nothing changed)" if args.dry_run else "repaired"
    print(f"reconcile: {checked:,} counts checked, {drifts:,} drifted and {verb}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tally.demo import DemoPlan, run_demo

    plan = DemoPlan(users=args.users, items=args.items, seed=args.seed)
    result = asyncio.run(run_demo(args.url, plan))
    return 1 if result["mismatched"] else 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.markdown:
        print("| setting | environment variable | default | meaning |")
        print("|---|---|---|---|")
        for name, env, default, doc in settings_mod.describe():
            shown = "see below" if name == "counters" else f"`{default!r}`"
            print(f"| `{name}` | `{env}` | {shown} | {doc} |")
        return 0
    s = settings_mod.load(args.config)
    for name, env, _default, doc in settings_mod.describe():
        print(f"{name:22} {env:30} {getattr(s, name)!r:32} {doc}")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tally.cluster import DevCluster, Layout, log_lag
    from tally.engines import EngineError

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tally", description=__doc__)
    p.add_argument("--url", default=DEFAULT_URL, help="the service's base URL")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], doc: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=doc, description=doc)
        sp.set_defaults(fn=fn)
        return sp

    sp = add("serve", cmd_serve, "run the HTTP API (embedded SQLite by default)")
    sp.add_argument("--config", help="TOML settings file (else $TALLY_CONFIG)")
    sp.add_argument("--host")
    sp.add_argument("--port", type=int)
    sp.add_argument("--role", choices=("api", "relay", "aggregator", "all"),
                    help="cluster backend: run only this role's parts (default: settings.role)")
    for name, on in (("like", True), ("unlike", False)):
        sp = add(name, cmd_toggle, f"{name} an item as a user")
        sp.add_argument("user")
        sp.add_argument("item", type=_item, help="TYPE:ID, e.g. post:42")
        sp.add_argument("--counter", default="like", help="any toggle counter (save, ...)")
        sp.set_defaults(on=on)
    sp = add("incr", cmd_incr, "add to an event counter (view, share, ...)")
    sp.add_argument("counter")
    sp.add_argument("item", type=_item)
    sp.add_argument("-n", type=int, default=1)
    sp.add_argument("--key", help="idempotency key: a repeat adds nothing")
    sp = add("count", cmd_count, "counts of one or more items")
    sp.add_argument("items", type=_item, nargs="+")
    sp.add_argument("--counter", action="append", help="only these counters (repeatable)")
    sp = add("has", cmd_has, "whether a user has liked (or set another toggle on) items")
    sp.add_argument("user")
    sp.add_argument("items", type=_item, nargs="+")
    sp.add_argument("--counter", default="like")
    sp = add("reconcile", cmd_reconcile, "recount from the like records, report and repair drift")
    sp.add_argument("items", type=_item, nargs="*", help="only these items (default: all)")
    sp.add_argument("--dry-run", action="store_true", help="report drift, change nothing")
    sp = add("demo", cmd_demo, "load a realistic small data set into a running service")
    sp.add_argument("--users", type=int, default=10_000)
    sp.add_argument("--items", type=int, default=1_000)
    sp.add_argument("--seed", type=int, default=7)
    sp = add("cluster", cmd_cluster, "a development cluster on loopback: PostgreSQL x2, NATS, Redis, "
             "2 APIs, a relay, 2 aggregators")
    sp.add_argument("action", choices=("up", "down", "status"))
    sp.add_argument("--dir", default="/tmp/tally-cluster", help="where data, config and logs go")
    sp.add_argument("--partitions", type=int, default=8, help="event-log partitions (up)")
    from tally.bench.cli import add_parser as add_bench

    add_bench(sub)
    sp = add("config", cmd_config, "print every setting, its variable, value and meaning")
    sp.add_argument("--config", help="TOML settings file (else $TALLY_CONFIG)")
    sp.add_argument("--markdown", action="store_true", help="the defaults as a Markdown table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.fn(args)
        return code
    except TallyAPIError as exc:
        print(f"tally: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"tally: configuration error: {exc.message}", file=sys.stderr)
        return 2
    except (OSError, httpx.TransportError) as exc:  # connection refused and the like
        print(f"tally: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
