"""``tally shards``: the PostgreSQL shard map and online moves of logical shards between databases.

Runs from any machine that reaches the cluster's PostgreSQL databases, with the cluster's settings
(``--config`` or ``$TALLY_CONFIG``); composes the stores like ``tally.bootstrap``. The mechanism and
its guarantees are in ``tally.store.postgres.reshard`` and docs/scale-out.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import orjson

from tally import logs
from tally import settings as settings_mod
from tally.core.errors import ConfigError, InvalidInput


def _progress(line: str) -> None:
    print(f"tally shards: {line}", file=sys.stderr, flush=True)


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    # Imported here: the other commands of the CLI need no database driver.
    from tally.runtime import postgres_config
    from tally.store.postgres.build import build_postgres
    from tally.store.postgres.reshard import ShardMover, parse_range

    s = settings_mod.load(args.config)
    logs.setup(s.log_level)  # the move's step lines, structured, on stderr beside the progress
    if s.backend != "cluster":
        raise ConfigError("tally shards needs backend 'cluster' (the embedded SQLite store has "
                          "no shard map)")
    pg = build_postgres(postgres_config(s))
    await pg.start()
    try:
        mover = ShardMover(pg.cluster, _progress)
        if args.action == "status":
            return {"epoch": pg.cluster.epoch, "map": pg.cluster.map.ranges(),
                    "databases": pg.cluster.databases, "active": await mover.active(),
                    "moves": await mover.history()}
        if args.action == "abort":
            return {"result": await mover.abort()}
        if args.range is None or args.to is None:
            raise InvalidInput("tally shards move needs a RANGE and --to DB", "range")
        move = await mover.plan(*parse_range(args.range), args.to)
        if args.dry_run:
            return {"dry_run": True, "move": move.describe(), "epoch": pg.cluster.epoch,
                    "rows": await mover.estimate(move),
                    "map_after": pg.cluster.map.moved(move.first, move.last,
                                                      move.target).ranges()}
        _progress(f"moving {move.describe()}")
        report = await mover.run(move)
        return report.as_dict()
    finally:
        await pg.close()


def cmd_shards(args: argparse.Namespace) -> int:
    try:
        result = asyncio.run(_run(args))
    except InvalidInput as exc:
        print(f"tally shards: {exc.message}", file=sys.stderr)
        return 2
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("action", choices=("status", "move", "abort"),
                    help="status: the map, its epoch and the moves; move: move RANGE to --to DB "
                         "while traffic flows (run again to resume a crashed move); abort: undo a "
                         "move that has not switched the map")
    sp.add_argument("range", nargs="?", help="move: logical shards FIRST-LAST (or one shard)")
    sp.add_argument("--to", type=int, help="move: the target database's index in postgres_dsns")
    sp.add_argument("--dry-run", action="store_true",
                    help="move: check the move and count its rows; change nothing")
    sp.add_argument("--config", help="TOML settings file (else $TALLY_CONFIG)")
