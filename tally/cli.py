"""The ``tally`` command: serve, write, read, reconcile and demo against a running service."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import orjson

from tally import settings as settings_mod
from tally import shards_admin
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
    from tally.api.server import uvicorn_options

    s = settings_mod.load(args.config)
    if args.port is not None or args.host is not None:
        s = s.replace(port=args.port or s.port, host=args.host or s.host)
    if args.role is not None:
        s = s.replace(role=args.role)
        os.environ["TALLY_ROLE"] = args.role  # for uvicorn's worker processes, when workers > 1
    logs.setup(s.log_level)
    common: dict[str, Any] = {"host": s.host, "port": s.port, "log_config": None,
                              "access_log": s.access_log, "timeout_graceful_shutdown": 10,
                              **uvicorn_options(s)}
    if s.workers > 1 and s.backend == "sqlite":  # one likes writer, several API processes
        from tally.api.processes import serve

        serve(s)
    elif s.workers > 1:  # each worker process builds its app from the same file and environment
        if args.config:
            os.environ["TALLY_CONFIG"] = args.config
        uvicorn.run("tally.api.app:create_app_from_env", factory=True, workers=s.workers, **common)
    else:
        uvicorn.run(create_app(s, owns_process=True), **common)
    return 0


def _token(admin: bool = False) -> str | None:
    """The credential from the environment: TALLY_ADMIN_TOKEN for admin commands (else the key),
    TALLY_API_KEY for the others."""
    if admin and os.environ.get("TALLY_ADMIN_TOKEN"):
        return os.environ["TALLY_ADMIN_TOKEN"]
    return os.environ.get("TALLY_API_KEY") or None


def cmd_toggle(args: argparse.Namespace) -> int:
    with Tally(args.url, token=_token()) as c:
        r = c.set(_id(args.user), args.item[0], args.item[1], args.counter, args.on)
    _print({"state": r.state, "changed": r.changed, "count": r.count})
    return 0


def cmd_incr(args: argparse.Namespace) -> int:
    with Tally(args.url, token=_token()) as c:
        r = c.incr(args.counter, args.item[0], args.item[1], args.n, args.key)
    _print({"applied": r.applied, "count": r.count})
    return 0


def cmd_count(args: argparse.Namespace) -> int:
    with Tally(args.url, token=_token()) as c:
        counts = c.counts(args.items, args.counter or None)
    _print([{"item": f"{t}:{i}", "counts": n} for (t, i), n in zip(args.items, counts,
                                                                  strict=True)])
    return 0


def cmd_has(args: argparse.Namespace) -> int:
    with Tally(args.url, token=_token()) as c:
        flags = c.has(_id(args.user), args.items, args.counter)
    _print({f"{t}:{i}": f for (t, i), f in zip(args.items, flags, strict=True)})
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    drifts = 0
    checked = 0
    with Tally(args.url, token=_token(admin=True)) as c:
        for line in c.reconcile_stream(args.items or None, repair=args.repair):
            checked = line["checked"]
            for d in line["drifts"]:
                drifts += 1
                print(f"drift {d['counter']} {d['item']}: stored {d['stored']}, "
                      f"recount {d['actual']}")
            print(f"\rchecked {checked:,} counts, {drifts:,} drifted", end="", file=sys.stderr)
    print(file=sys.stderr)
    verb = "repaired" if args.repair else "found (dry run, nothing changed; --repair fixes)"
    print(f"reconcile: {checked:,} counts checked, {drifts:,} drifted and {verb}")
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    return shards_admin.cmd_shards(args)


def cmd_config(args: argparse.Namespace) -> int:
    rows = settings_mod.describe()
    if args.markdown:
        group = None
        for row in rows:
            if row.group != group:
                group = row.group
                print(f"{'' if row is rows[0] else chr(10)}**{group}**\n")
                print("| setting | environment variable | default | meaning |")
                print("|---|---|---|---|")
            shown = "see below" if row.name == "counters" else f"`{row.default!r}`"
            print(f"| `{row.name}` | `{row.env}` | {shown} | {row.help} |")
        return 0
    s = settings_mod.load(args.config)
    for row in rows:
        print(f"{row.group:9} {row.name:28} {row.env:34} {getattr(s, row.name)!r:32} {row.help}")
    return 0


Adder = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def _add_plugins(sub: Any, add: Adder) -> None:
    """Commands from other installed packages (entry-point group ``tally.commands``).

    The development tools (``tally cluster``, ``tally bench``, ``tally demo``) live in ``tally_dev``
    so that the product package holds only what a deployment runs; when they are installed they
    still appear here, without the product importing them.
    """
    from importlib.metadata import entry_points

    for ep in entry_points(group="tally.commands"):
        ep.load()(sub, add)


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
    sp = add("reconcile", cmd_reconcile, "recount from the like records, report drift and, with "
             "--repair, repair it")
    sp.add_argument("items", type=_item, nargs="*", help="only these items (default: all)")
    sp.add_argument("--repair", action="store_true",
                    help="write the recounts (without it: report drift, change nothing)")
    sp = add("shards", cmd_shards, "the PostgreSQL shard map: status, and moving logical shards "
             "between databases while traffic flows")
    shards_admin.add_arguments(sp)
    _add_plugins(sub, add)
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
