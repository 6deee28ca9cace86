"""Online resharding on the dev cluster under a client ledger: ``python -m tally_dev.reshard_chaos``
(``make chaos-reshard``); ``tests/store/test_reshard.py`` runs a short in-process case.

The cluster of ``tally cluster up`` (two API processes, a relay, two aggregators, two PostgreSQL
servers, NATS JetStream, Redis) takes like/unlike load from the HTTP ledger (tally_dev/chaos). Mid-
load, ``tally shards move`` (the real command, as a subprocess with the cluster's settings) moves
ranges of logical shards: off the coordinator database, onto it, and back. Each move's own report
gives the write pause it caused (fence to release); the ledger gives what clients saw (503s with
Retry-After, and how long each retried write took from its first attempt). Then every acknowledged
state is read back, every count compared with the ledger, and the server's own recount run.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from tally.store.shards import ShardMap, logical_shard
from tally_dev.chaos.ledger import Ledger
from tally_dev.cluster import DevCluster, Layout

# (first, last, to) over the default even split of 4,096 shards (0-2047 on 0, 2048-4095 on 1).
MOVES = ((0, 511, 1), (2048, 3071, 0), (0, 511, 0))


async def _move(config: Path, first: int, last: int, to: int) -> dict[str, Any]:
    tally = str(Path(sys.executable).with_name("tally"))
    proc = await asyncio.create_subprocess_exec(
        tally, "shards", "move", f"{first}-{last}", "--to", str(to), "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 600)
    if proc.returncode != 0:
        raise RuntimeError(f"tally shards move failed ({proc.returncode}): {err.decode()}")
    report: dict[str, Any] = orjson.loads(out)
    return report


def _pct(values: list[float], q: float) -> float:
    return round(sorted(values)[min(int(q * len(values)), len(values) - 1)], 3) if values else 0.0


async def prefill(config: Path, rows: int) -> float:
    """Add ``rows`` like records (state off, as an unlike leaves them) of users of database 0, so
    that the first move copies a realistic volume beside the ledger's few hundred pairs; they
    change no count and no answer the ledger checks. Returns the seconds it took."""
    started = time.monotonic()
    s = tomllib.loads(config.read_text())["tally"]
    shards = int(s.get("logical_shards", 4096))
    table = ShardMap.build(shards, len(s["postgres_dsns"]))
    users = [f"pf{n}" for n in range(rows * 3)]
    mine = [(u, logical_shard(u, shards)) for u in users if table.db_of(u) == 0][:rows]
    conn = await asyncpg.connect(s["postgres_dsns"][0])
    try:
        for start in range(0, len(mine), 20_000):
            part = mine[start:start + 20_000]
            await conn.execute(
                "INSERT INTO toggles (counter, user_id, item, state, version, updated_at, shard) "
                "SELECT 'like', u, 'post:999999', false, 2, 0, s FROM unnest($1::text[], "
                "$2::int[]) AS k(u, s) ON CONFLICT DO NOTHING",
                [u for u, _ in part], [sh for _, sh in part])
    finally:
        await conn.close()
    return time.monotonic() - started


async def run(dev: DevCluster, settle_s: float, users: int, items: int,
              prefill_rows: int) -> dict[str, Any]:
    prefill_s = await prefill(dev.config, prefill_rows) if prefill_rows else 0.0
    ledger = Ledger(dev.urls("api"), users=users, items=items, clients=8)
    tasks = ledger.start()
    moves = []
    try:
        await asyncio.sleep(settle_s)
        for first, last, to in MOVES:
            errors_before = ledger.errors["HTTP 503"]
            retried_before = len(ledger.retried_s)
            started = time.monotonic()
            report = await _move(dev.config, first, last, to)
            retried = ledger.retried_s[retried_before:]
            # Every write in flight at any moment between the fence and the release, refused or
            # held behind the guard's lock: what the pause cost the clients.
            fenced, released = report["fenced_at"], report["released_at"]
            touched = [took for began, took in ledger.writes
                       if fenced and released and began < released and began + took > fenced]
            moves.append({"range": f"{first}-{last}", "to": to,
                          "took_s": round(time.monotonic() - started, 2),
                          "copy_s": report.get("copy_s"),
                          "write_pause_s": report["write_pause_s"],
                          "count_pause_s": report["count_pause_s"],
                          "pause_parts": report["pause_parts"],
                          "copied": report["copied"], "fenced_keys": report["fenced_keys"],
                          "catch_up_rounds": report["catch_up_rounds"],
                          "readers_waited": report["readers_waited"],
                          "readers_gone": report["readers_gone"],
                          "client_503s": ledger.errors["HTTP 503"] - errors_before,
                          "client_retried_writes": len(retried),
                          "client_retried_p50_s": _pct(retried, 0.5),
                          "client_retried_max_s": _pct(retried, 1.0),
                          "writes_overlapping_pause": len(touched),
                          "overlapping_p50_s": _pct(touched, 0.5),
                          "overlapping_max_s": _pct(touched, 1.0)})
            await asyncio.sleep(settle_s)
    finally:
        await ledger.stop(tasks)
    verdict = await ledger.verify(dev.urls("api")[0])
    every = [took for _, took in ledger.writes]
    verdict["all_writes_p50_s"] = _pct(every, 0.5)
    verdict["all_writes_p99_s"] = _pct(every, 0.99)
    pauses = [m["write_pause_s"] for m in moves if m["write_pause_s"] is not None]
    return {"prefill_rows": prefill_rows, "prefill_s": round(prefill_s, 1),
            "moves": moves, "verify": verdict,
            "write_pause_p50_s": round(statistics.median(pauses), 4) if pauses else None,
            "write_pause_max_s": max(pauses) if pauses else None}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tally_dev.reshard_chaos")
    p.add_argument("--dir", default="/tmp/tally-reshard-chaos")
    p.add_argument("--settle-s", type=float, default=8.0, help="load before, between and after "
                                                               "the moves")
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--items", type=int, default=40)
    p.add_argument("--prefill", type=int, default=200_000,
                   help="like records (state off) added to database 0 before the load, so the "
                        "first move copies about a quarter of them")
    p.add_argument("--out", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    dev = DevCluster(Path(args.dir), Layout(partitions=8),
                     settings={"aggregate_window_ms": 20.0, "lease_period_ms": 200.0,
                               "log_level": "WARNING"})
    if dev.root.exists() and not any(row["running"] for row in dev.status()):
        shutil.rmtree(dev.root)  # a finished run's databases: the moves start from the even split
    dev.up()
    try:
        out = asyncio.run(run(dev, args.settle_s, args.users, args.items, args.prefill))
    finally:
        dev.down()
    text = orjson.dumps(out, option=orjson.OPT_INDENT_2).decode()
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    v = out["verify"]
    ok = v["lost"] == 0 and v["converged"] and v["server_recount_drifts"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
