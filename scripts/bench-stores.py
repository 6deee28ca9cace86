#!/usr/bin/env python3
"""Store-level write and batch-read rates, PostgreSQL (2 databases, throwaway server) beside SQLite.

No HTTP, no aggregator: this measures what the like store and count store cost by themselves, side
by side in one run, on this machine. Bounded: ``--seconds`` per phase (default 5).

    .venv/bin/python scripts/bench-stores.py --concurrency 32 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tally.core.coalesce import coalesce
from tally.core.model import ToggleOp
from tally_dev.engines import PostgresEngine
from tally.settings import Settings
from tally.store.postgres.build import PostgresStores, build_postgres
from tally.store.sqlite.store import SqliteStore


async def run(name: str, op: Callable[[int], Awaitable[Any]], concurrency: int,
              seconds: float) -> None:
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    counter = iter(range(10**9))

    async def worker() -> None:
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            await op(next(counter))
            latencies.append(time.perf_counter() - t0)

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - t0
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
    print(f"{name:34s} {len(latencies) / elapsed:9.0f} ops/s   p50 "
          f"{statistics.median(latencies) * 1000:6.2f} ms   p99 {p99:6.2f} ms   n={len(latencies)}")


def like_op(i: int, items: int) -> ToggleOp:
    return ToggleOp("like", f"post:{random.randrange(items)}", f"user{i}", True, "eu")


async def bench_sqlite(root: Path, args: argparse.Namespace) -> None:
    store = SqliteStore(root / "bench.db", "FULL")
    await store.start()
    try:
        await run("sqlite  like (FULL)", lambda i: store.write([like_op(i, args.items)]),
                  args.concurrency, args.seconds)
        await drain_sqlite(store)
        keys = [("like", f"post:{n}") for n in range(args.items)]
        await run("sqlite  get batch-50", lambda i: store.get(random.sample(keys, 50)),
                  args.concurrency, args.seconds)
    finally:
        await store.close()


async def drain_sqlite(store: SqliteStore) -> None:
    while True:
        marks = await store.watermarks("bench")
        events = await store.read(marks.get(store.source, 0), 20_000)
        if not events:
            return
        await store.apply_batch(coalesce(events, applied=marks), "bench", marks)


async def drain_postgres(stores: PostgresStores) -> int:
    """Relay and aggregator in one loop: outbox -> batch -> counts (cross-database) -> trim."""
    applied = 0
    for source in stores.likes.sources():
        while events := await stores.likes.pending(source, 0, 20_000):
            marks = await stores.counts.watermarks("bench")
            await stores.counts.apply_batch(coalesce(events, applied=marks), "bench", marks)
            await stores.likes.trim(source, events[-1].seq)
            applied += len(events)
    return applied


async def bench_postgres(dsns: list[str], args: argparse.Namespace) -> None:
    stores = build_postgres(Settings().replace(backend="cluster", postgres_dsns=dsns,
                                               postgres_pool_max=args.concurrency))
    await stores.start()
    try:
        await run("postgres like (sync commit on)",
                  lambda i: stores.likes.write([like_op(i, args.items)]),
                  args.concurrency, args.seconds)
        t0 = time.monotonic()
        applied = await drain_postgres(stores)
        took = time.monotonic() - t0
        print(f"postgres outbox -> counts: {applied} events in {took:.2f} s "
              f"({applied / took:.0f} events/s, batches of up to 20000 per source)")
        keys = [("like", f"post:{n}") for n in range(args.items)]
        await run("postgres get batch-50", lambda i: stores.counts.get(random.sample(keys, 50)),
                  args.concurrency, args.seconds)
    finally:
        await stores.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--items", type=int, default=1000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tally-bench-"))
    root.chmod(0o711)
    pg = PostgresEngine(root / "pg")
    try:
        pg.start()
        dsns = [pg.create_database("bench0"), pg.create_database("bench1")]
        asyncio.run(bench_sqlite(root, args))
        asyncio.run(bench_postgres(dsns, args))
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"cpus={os.cpu_count()} concurrency={args.concurrency} seconds={args.seconds}")


if __name__ == "__main__":
    main()
