"""A client ledger around an online shard move: like/unlike and keyed-view load through two
"API processes" (each its own ``PgCluster``, so each re-reads the shard map on its own), the relay
and aggregator path running throughout, and ``ShardMover`` moving a range mid-load.

Each (user, item) pair belongs to one client, which writes it sequentially, so its last
acknowledged state is the truth; a write refused by a moving shard's guard (503) is retried until
acknowledged and its refusals are timed. Keyed views are retried under the same key: each key
counts once. Used by tests/store/test_reshard.py (short) and ``tally-dev reshard-chaos`` (long).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tally.core.errors import Unavailable
from tally.core.model import IncrOp, ToggleOp
from tally.store.jetstream.eventlog import EventLog
from tally.store.postgres.cluster import PgCluster, ShardMoving
from tally.store.postgres.counts import PostgresCountStore
from tally.store.postgres.likes import PostgresLikeStore
from tally.store.postgres.reshard import MoveReport, ShardMover
from tally.store.shards import ShardMap
from tally.workers.partitions import PartitionWorker
from tally.workers.relay import GroupRelay

PARTITIONS = 4


@dataclass
class Ledger:
    users: int
    items: int
    clients: int
    state: dict[tuple[int, int], bool] = field(default_factory=dict)
    views: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))
    acked: int = 0
    refused: int = 0  # writes answered "shard moving" (503), each retried
    other_failures: int = 0
    refused_at: list[float] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)  # first refusal -> acknowledgement

    async def write(self, stores: Sequence[PostgresLikeStore], op: ToggleOp | IncrOp,
                    deadline: float) -> None:
        first_refusal = None
        while True:
            try:
                await random.choice(stores).write([op])
                self.acked += 1
                if first_refusal is not None:
                    self.delays.append(time.monotonic() - first_refusal)
                return
            except ShardMoving:
                self.refused += 1
                now = time.monotonic()
                self.refused_at.append(now)
                first_refusal = first_refusal or now
            except Unavailable:
                self.other_failures += 1
            assert time.monotonic() < deadline, "a write was never acknowledged"
            await asyncio.sleep(0.01)

    async def client(self, n: int, stores: Sequence[PostgresLikeStore], stop_at: float) -> None:
        rng = random.Random(n)
        mine = [(u, i) for u in range(self.users) for i in range(self.items)
                if (u * self.items + i) % self.clients == n]
        views = 0
        while time.monotonic() < stop_at:
            if rng.random() < 0.15:
                item = rng.randrange(self.items)
                key = f"c{n}-v{views}"
                views += 1
                await self.write(stores, IncrOp("view", f"post:{item}", 1, "", key),
                                 stop_at + 60)
                self.views[item].add(key)
                continue
            u, i = rng.choice(mine)
            on = not self.state.get((u, i), False)
            await self.write(stores, ToggleOp("like", f"post:{i}", f"u{u}", on, ""), stop_at + 60)
            self.state[(u, i)] = on

    def window(self) -> tuple[float, float] | None:
        if not self.refused_at:
            return None
        return self.refused_at[0], self.refused_at[-1]

    def summary(self) -> dict[str, Any]:
        d = sorted(self.delays)
        w = self.window()
        return {"acked": self.acked, "refused": self.refused,
                "other_failures": self.other_failures,
                "refused_window_s": round(w[1] - w[0], 4) if w else 0.0,
                "retried_writes": len(d),
                "delay_p50_s": round(statistics.median(d), 4) if d else 0.0,
                "delay_max_s": round(d[-1], 4) if d else 0.0}


class Pipeline:
    """Relay every outbox source to the log and apply every partition, again and again."""

    def __init__(self, likes: PostgresLikeStore, log: EventLog, counts: PostgresCountStore):
        self.relays = [GroupRelay([s], likes, log) for s in likes.sources()]
        self.workers = [PartitionWorker(p, log, counts, None, 0.0, ("day", "region"))
                        for p in range(PARTITIONS)]

    async def round(self) -> int:
        moved = 0
        for relay in self.relays:
            while n := await relay.step():
                moved += n
        for worker in self.workers:
            moved += await worker.drain()
        return moved

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.round()
            await asyncio.sleep(0.02)


async def recount(cluster: PgCluster) -> dict[str, int]:
    """Likes per item from the records, each database counting only the shards it holds."""
    out: dict[str, int] = defaultdict(int)
    for db in range(cluster.databases):
        held = cluster.map.owned(db)
        rows = await cluster.fetch(
            db, "SELECT item, count(*) FROM toggles WHERE state AND counter = 'like' AND EXISTS "
            "(SELECT 1 FROM unnest($1::int[], $2::int[]) AS r(f, l) WHERE shard BETWEEN r.f "
            "AND r.l) GROUP BY item", [f for f, _ in held], [last for _, last in held])
        for r in rows:
            out[r[0]] += int(r[1])
    return dict(out)


async def run_move_under_load(dsns: list[str], nats_url: str, stream: str, shards: int,
                              move: tuple[int, int, int], load_s: float, move_after_s: float,
                              users: int = 200, items: int = 30,
                              clients: int = 6) -> dict[str, Any]:
    """Load, move ``(first, last, to)`` after ``move_after_s``, settle; returns what was checked."""
    shard_map = ShardMap.build(shards, len(dsns))
    apis = [PgCluster(dsns, shard_map, pool_max=6) for _ in range(2)]
    workers = PgCluster(dsns, shard_map, pool_max=6)
    mover_cluster = PgCluster(dsns, shard_map, pool_max=6)
    stores = [PostgresLikeStore(c, outbox_slots=2) for c in apis]
    counts = PostgresCountStore(workers)
    log = EventLog(nats_url, stream, PARTITIONS)
    for store in stores:
        await store.start()
    await counts.start()
    await log.start()
    await mover_cluster.start()
    worker_likes = PostgresLikeStore(workers, outbox_slots=2)
    pipeline = Pipeline(worker_likes, log, counts)
    ledger = Ledger(users, items, clients)
    stop = asyncio.Event()
    report: MoveReport | None = None
    try:
        started = time.monotonic()
        stop_at = started + load_s
        pipe = asyncio.create_task(pipeline.run(stop))
        load = [asyncio.create_task(ledger.client(n, stores, stop_at)) for n in range(clients)]
        await asyncio.sleep(move_after_s)
        mover = ShardMover(mover_cluster)
        plan = await mover.plan(*move)
        move_started = time.monotonic()
        report = await mover.run(plan)
        move_s = time.monotonic() - move_started
        await asyncio.gather(*load)
        stop.set()
        await pipe
        for _ in range(50):  # settle: everything acknowledged relayed and applied
            if await pipeline.round() == 0:
                break
        truth_likes: dict[str, int] = defaultdict(int)
        for (_, i), on in ledger.state.items():
            truth_likes[f"post:{i}"] += on
        fresh = PgCluster(dsns, shard_map, pool_max=4)
        reader = PostgresLikeStore(fresh)
        fresh_counts = PostgresCountStore(fresh)
        await reader.start()
        await fresh_counts.start()
        try:
            lost_states = 0
            for u in range(users):
                flags = await reader.has("like", f"u{u}", [f"post:{i}" for i in range(items)])
                lost_states += sum(flags[i] != ledger.state.get((u, i), False)
                                   for i in range(items))
            keys = [("like", f"post:{i}") for i in range(items)]
            keys += [("view", f"post:{i}") for i in range(items)]
            stored = await fresh_counts.get(keys)
            records = await recount(fresh)
            like_diff = {i: (stored.get(("like", f"post:{i}"), 0), truth_likes[f"post:{i}"],
                             records.get(f"post:{i}", 0)) for i in range(items)
                         if not stored.get(("like", f"post:{i}"), 0)
                         == truth_likes[f"post:{i}"] == records.get(f"post:{i}", 0)}
            view_diff = {i: (stored.get(("view", f"post:{i}"), 0), len(ledger.views[i]))
                         for i in range(items)
                         if stored.get(("view", f"post:{i}"), 0) != len(ledger.views[i])}
            first, last, to = move
            left_on_source = await fresh.fetch(
                report.move.source, "SELECT count(*) FROM toggles WHERE shard BETWEEN $1 AND $2",
                first, last)
            on_target = await fresh.fetch(
                to, "SELECT count(*) FROM toggles WHERE shard BETWEEN $1 AND $2", first, last)
            epoch = fresh.epoch
        finally:
            await fresh_counts.close()
            await reader.close()
        return {"ledger": ledger.summary(), "move": report.as_dict(), "move_s": round(move_s, 3),
                "lost_states": lost_states, "like_mismatches": like_diff,
                "view_mismatches": view_diff, "left_on_source": int(left_on_source[0][0]),
                "on_target": int(on_target[0][0]), "epoch": epoch,
                "likes_total": sum(truth_likes.values()),
                "views_total": sum(len(v) for v in ledger.views.values()),
                "fenced_writes": sum(c.fenced for c in apis),
                "count_fence_waits": counts.fenced_waits,
                "api_epochs": [c.epoch for c in apis]}
    finally:
        stop.set()
        await log.close()
        await counts.close()
        for store in stores:
            await store.close()
        await mover_cluster.close()
