"""``tally capacity``: the fleet for a load, from the per-core figures measured here.

    tally capacity                                  the requirements' scale, built-in figures
    tally capacity --regions 1 --json               one region, as JSON
    tally capacity --from bench-results/result.json the figures of a `make bench` run instead
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import fields
from pathlib import Path

import orjson

from tally_dev.capacity import rates as rates_mod
from tally_dev.capacity.model import CapacityError, Load, Rates, plan
from tally_dev.capacity.render import as_dict, text

_SUFFIX = {"k": 1e3, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}

# Every input once: its flag comes from the field's name, its default from Load.
HELP = {
    "items": "items that can be liked (posts, reels, comments)",
    "daily_users": "daily active users",
    "likes_per_user_per_day": "likes and unlikes per daily user per day",
    "likes_per_day": "likes and unlikes per day (instead of users x likes per user)",
    "peak_factor": "peak second / average second",
    "reads_per_s": "peak count reads per second (one item's count each)",
    "feed_size": "items per read request (a feed page: counts and has-liked)",
    "replication": "copies of PostgreSQL and JetStream data in each region",
    "redis_replicas": "Redis replicas per shard",
    "regions": "regions; each is sized to carry a lost one's share",
    "retention_days": "days the event log keeps events",
    "cached_share": "share of items whose count Redis holds",
    "new_record_share": "share of toggles that create a like record (not flip one back)",
    "pg_cache_miss": "share of has-liked seeks that read the disk",
    "utilisation": "share of each CPU role's cores busy at peak",
    "pg_cores_per_server": "cores of a PostgreSQL server",
    "pg_disk_tb_per_server": "usable TB of disk of a PostgreSQL server",
    "nats_cores_per_node": "cores of a JetStream node",
    "nats_disk_tb_per_node": "usable TB of disk of a JetStream node",
    "redis_gb_per_node": "usable GB of memory of a Redis node",
    "api_cores_per_server": "cores of an API server",
    "log_partitions": "event-log partitions of the stream (settings.log_partitions)",
    "hot_top_k": "hot counts an API process keeps (the sketch's k, tally/core/hotkeys.py)",
}
_WHOLE = {f.name for f in fields(Load) if f.type == "int"}


def number(raw: str) -> float:
    """A positive-or-zero finite number: 50e9, 50_000_000_000, 50B, 2.5M, 20k."""
    text_ = raw.strip()
    scale = 1.0
    if text_ and text_[-1] in _SUFFIX:
        text_, scale = text_[:-1], _SUFFIX[text_[-1]]
    try:
        value = float(text_) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r} (e.g. 50e9, 50B, 2.5M)") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {raw!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {raw!r}")
    return value


def whole(raw: str) -> int:
    value = number(raw)
    if value != int(value):
        raise argparse.ArgumentTypeError(f"must be a whole number: {raw!r}")
    return int(value)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = __doc__
    defaults = Load()
    per_user = p.add_mutually_exclusive_group()
    for f in fields(Load):
        target = per_user if f.name in ("likes_per_user_per_day", "likes_per_day") else p
        default = getattr(defaults, f.name)
        shown = "none" if default is None else f"{default:g}"
        target.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, metavar="N",
                            type=whole if f.name in _WHOLE else number, default=default,
                            help=f"{HELP[f.name]} (default {shown})")
    p.add_argument("--from", dest="from_file", type=Path, metavar="FILE",
                   help="per-core figures from a benchmark result (bench-results/result.json); "
                        "default: the figures measured here, each printed with its source")
    p.add_argument("--json", action="store_true", help="the plan as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        load = Load(**{f.name: getattr(args, f.name) for f in fields(Load)})
        rates = rates_mod.builtin() if args.from_file is None else _read(args.from_file)
        result = plan(load, rates)
    except CapacityError as exc:
        print(f"tally capacity: {exc}", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.write(orjson.dumps(as_dict(result), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(text(result))
    return 0


def _read(path: Path) -> Rates:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CapacityError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CapacityError(f"{path} is not JSON: {exc}") from exc
    return rates_mod.from_result(data, str(path))
