"""Cost as the data grows, on the cluster: its smallest layout with N likes already stored.

``tally bench grow --cluster --sizes 0,10000000`` starts the dev cluster the suite measures (one
API, relay and aggregator, one PostgreSQL, NATS, Redis) once per size, loads the like records and
their counts straight into PostgreSQL (COPY: far faster than through the API), and measures
uniform likes and the feed at their closed-loop maxima with each role's CPU per operation. The
records are those of the embedded loader (``grow.item_counts``: Zipf-drawn items, a user each),
placed by the same shard map the service routes by, so the service finds and counts on from them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

from tally.settings import load as load_settings
from tally.store.shards import ShardMap
from tally_dev.bench.grow import item_counts, load_progress, vs_empty
from tally_dev.bench.workloads import Params

if TYPE_CHECKING:
    from tally_dev.bench.suite import Suite
    from tally_dev.cluster import DevCluster

TOGGLE_COLUMNS = ("counter", "user_id", "item", "state", "version", "updated_at", "shard")
# The partial index by item is rebuilt once after the load: kept during it, each record would
# land at a random place of it.
BY_ITEM = "CREATE INDEX IF NOT EXISTS toggles_on_by_item ON toggles (counter, item) WHERE state"


def user_id(n: int) -> str:
    """Zero-padded, so the users' order is their numbers' and records go in in key order."""
    return f"g{n:010d}"


async def preload(dsns: Sequence[str], likes: int, shards: int, params: Params = Params(),
                  seed: int = 1, chunk: int = 200_000,
                  progress: Callable[[int], None] | None = None) -> float:
    """Loads ``likes`` like records and their counts into the cluster's databases (schema already
    made by its processes); returns the seconds it took. User n likes the n-th of the drawn
    likes, shuffled, so the records go in in primary-key order (counter, user, item)."""
    import numpy as np

    started = time.monotonic()
    smap = ShardMap.build(shards, len(dsns))
    per_item = item_counts(likes, params, seed)
    items = np.repeat(np.array([i for i, _ in per_item], dtype=object),
                      [n for _, n in per_item])
    np.random.default_rng(seed).shuffle(items)
    conns = [await asyncpg.connect(dsn) for dsn in dsns]
    try:
        for conn in conns:
            await conn.execute("DROP INDEX IF EXISTS toggles_on_by_item")
        now = time.time()
        for start in range(0, likes, chunk):
            parts: list[list[tuple[Any, ...]]] = [[] for _ in conns]
            for n in range(start, min(start + chunk, likes)):
                user = user_id(n)
                shard = smap.shard_of(user)
                parts[smap.db_of_shard(shard)].append(("like", user, items[n], True, 1, now, shard))
            for conn, rows in zip(conns, parts, strict=True):
                if rows:
                    await conn.copy_records_to_table("toggles", records=rows,
                                                     columns=TOGGLE_COLUMNS)
            if progress is not None:
                progress(min(start + chunk, likes))
        counts: list[list[tuple[str, str, int]]] = [[] for _ in conns]
        for item, n in per_item:
            counts[smap.db_of(item)].append((item, "like", n))
        for conn, rows in zip(conns, counts, strict=True):
            await conn.copy_records_to_table("counts", records=rows,
                                             columns=("item", "counter", "count"))
            await conn.execute(BY_ITEM)
            await conn.execute("ANALYZE")
    finally:
        for conn in conns:
            await conn.close()
    return time.monotonic() - started


def run(sizes: list[int], out: Path, duration_s: float = 6.0,
        show_progress: bool = True) -> dict[str, Any]:
    """One cluster per size, each measured on uniform likes and the feed; results in ``out``."""
    from tally_dev.bench.suite import Suite, SuitePlan

    work = Path(tempfile.mkdtemp(prefix="tally-grow-cluster-"))
    os.chmod(work, 0o755)  # PostgreSQL runs as an unprivileged user and must reach its directory
    suite = Suite(SuitePlan(duration_s=duration_s, rounds=1, wrk=False), work, show_progress)
    try:
        rows = [_measure_size(size, work, suite, show_progress) for size in sizes]
    finally:
        shutil.rmtree(work, ignore_errors=True)  # about 1.5 GB per 10 million likes
    out.mkdir(parents=True, exist_ok=True)
    result = {"rows": rows, "runs": suite.runs}
    (out / "grow-cluster.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    (out / "grow-cluster.md").write_text(markdown(rows))
    return result


def _measure_size(size: int, work: Path, suite: Suite, show_progress: bool) -> dict[str, Any]:
    from urllib.parse import urlsplit

    from tally_dev.cluster import DevCluster, Layout

    layout = Layout(apis=1, relays=1, aggregators=1, partitions=4, databases=1)
    cluster = DevCluster(work / f"cluster-{size}", layout, settings={"log_level": "WARNING"})
    try:
        cluster.up()
        row: dict[str, Any] = {"likes": size, "load_s": 0.0}
        if size:
            settings = load_settings(cluster.config, env={})
            row["load_s"] = round(asyncio.run(preload(
                settings.postgres_dsns, size, settings.logical_shards,
                progress=load_progress(size) if show_progress else None)), 1)
            row["bytes_per_like"] = _bytes_per_like(cluster)
        port = urlsplit(cluster.urls("api")[0]).port or 80
        groups = {r["name"]: r["pid"] for r in cluster.status()}
        for preset in ("uniform", "feed"):
            suite.measure_cluster(cluster, groups, port, preset)
            r = suite.runs[-1]
            ops = r["throughput_per_s"] * (r.get("cpu_wall_s") or 1.0)
            row[preset] = {"per_s": round(r["throughput_per_s"], 1),
                           "p99_ms": r["latency"].get("p99_ms"),
                           "cpu_us_per_op": {role: round(s * 1e6 / ops, 1) if ops else None
                                             for role, s in r.get("cpu_s", {}).items()}}
    finally:
        cluster.down()
    if show_progress:
        print(f"  {size:>12,} likes: {row}", file=sys.stderr)
    return row


def _bytes_per_like(cluster: DevCluster) -> float | None:
    from tally_dev.bench.suite import _pg_table_bytes

    toggles = _pg_table_bytes(cluster).get("toggles")
    return round(toggles["bytes_per_record"], 1) if toggles else None


def markdown(rows: list[dict[str, Any]]) -> str:
    empty = rows[0] if rows and rows[0]["likes"] == 0 else None
    out = ["| likes stored | bytes/like (toggles) | uniform likes/s (p99 ms) | API / PostgreSQL CPU "
           "us per like | feed req/s (p99 ms) | API / PostgreSQL CPU us per feed |",
           "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        u, f = r["uniform"], r["feed"]
        rel, frel = vs_empty(r, empty)
        out.append(f"| {r['likes']:,} | {r.get('bytes_per_like') or '-'} | {u['per_s']:,.0f} "
                   f"({u['p99_ms']:.1f}){rel} | {_cpu(u, 'api')} / {_cpu(u, 'postgres')} | "
                   f"{f['per_s']:,.0f} ({f['p99_ms']:.1f}){frel} | {_cpu(f, 'api')} / "
                   f"{_cpu(f, 'postgres')} |")
    return "\n".join(out) + "\n"


def _cpu(run: dict[str, Any], role: str) -> str:
    cpu = run.get("cpu_us_per_op") or {}
    got = [v for k, v in cpu.items() if k.startswith(role) and v is not None]
    return f"{sum(got):.0f}" if got else "-"
