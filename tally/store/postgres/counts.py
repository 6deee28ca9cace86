"""Counts on PostgreSQL shards by ITEM, applied exactly once with the consumers' watermarks.

A batch's keys may live in several databases, so one transaction cannot hold them all. Exactly-once
comes from a decision made in one place and applied idempotently everywhere else:

1. Decide, in one transaction on the coordinator (database 0): lock the consumer's row, check the
   stored watermarks against ``expect`` (else return None, nothing written), add the deltas of the
   items that live in database 0 and the rollups, move the watermarks to ``batch.positions``, and,
   when other databases are touched, record an *intent*: the consumer's next intent number with
   the deltas for each other database. Once this commits, the batch is applied, durably, once.
2. Roll forward: in each other database, one transaction adds that database's deltas and moves its
   ``applied_intents`` mark for the consumer to the intent number, only if the mark is below it.
   Then the intent is deleted.

A crash or an unreachable database between 1 and 2 leaves the intent; the next ``watermarks`` or
``apply_batch`` call for that consumer (from any process) rolls it forward first, and a consumer
never decides a new batch while an intent of its own is pending, so intents apply in order and the
mark test cannot skip one. Redelivered events are at or below the moved watermark and are skipped
by ``coalesce``; a racing duplicate apply fails the watermark test. Reads may see a database's
share of a batch a moment after the coordinator's share, never twice.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from tally.core.coalesce import Batch
from tally.core.errors import Unavailable
from tally.core.model import CountKey
from tally.store.postgres.cluster import COORDINATOR, PgCluster, read_counts
from tally.store.shards import ShardMap

_ADD = ("INSERT INTO counts (item, counter, count) "
        "SELECT i, c, d FROM unnest($1::text[], $2::text[], $3::bigint[]) AS k(c, i, d) "
        "ORDER BY c, i ON CONFLICT (counter, item) DO UPDATE SET count = counts.count + excluded.count "
        "RETURNING counter, item, count")
# The consumer's row, locked, and the map's head, share-locked: the decision's fence.
_HEAD = ("SELECT c.last_intent, h.epoch, h.counts_fence_first, h.counts_fence_last "
         "FROM consumers c, shard_map_head h WHERE c.consumer = $1 "
         "FOR UPDATE OF c FOR SHARE OF h")
# Read once the lock is held, in a statement of its own (its snapshot then sees what the lock's
# previous holder committed): a pending intent, and the batch's sources' stored watermarks.
_STATE = ("SELECT EXISTS (SELECT 1 FROM intents WHERE consumer = $1), "
          "array_agg(source), array_agg(seq) FROM watermarks "
          "WHERE consumer = $1 AND source = ANY($2)")
# The decision's writes in one statement: database 0's counts (returned), the rollups and the
# watermarks. Each part locks its rows in key order; rollup rows are the only ones several
# consumers share, so the parts' order among themselves cannot deadlock two decisions.
_APPLY = """
WITH rolled AS (
    INSERT INTO rollups (counter, item_type, dimension, bucket, value)
    SELECT * FROM unnest($4::text[], $5::text[], $6::text[], $7::text[], $8::bigint[])
        AS r(c, t, d, b, v) ORDER BY 1, 2, 3, 4
    ON CONFLICT (counter, item_type, dimension, bucket)
    DO UPDATE SET value = rollups.value + excluded.value
), marked AS (
    INSERT INTO watermarks (consumer, source, seq)
    SELECT $9, s, q FROM unnest($10::text[], $11::bigint[]) AS w(s, q) ORDER BY s
    ON CONFLICT (consumer, source) DO UPDATE SET seq = excluded.seq
)
INSERT INTO counts (item, counter, count)
SELECT i, c, d FROM unnest($1::text[], $2::text[], $3::bigint[]) AS k(c, i, d) ORDER BY c, i
ON CONFLICT (counter, item) DO UPDATE SET count = counts.count + excluded.count
RETURNING counter, item, count
"""

Part = list[tuple[str, str, int]]  # (counter, item, delta) of one database


@dataclass
class _Decided:
    counts: dict[CountKey, int]
    intent: int | None
    parts: dict[int, Part]


_PENDING = object()  # the consumer has an intent to roll forward before deciding
_STALE_MAP = object()  # the parts were routed by an older shard map than the coordinator's
_FENCED = object()  # the batch holds counts of logical shards a move is copying
# How long an aggregator waits on the counts of a moving range before its batch fails (and is
# retried from its watermarks): far above a move's count-copy and switch.
COUNT_FENCE_WAIT_S = 300.0


async def add_counts(conn: asyncpg.Connection, part: Part) -> dict[CountKey, int]:
    if not part:
        return {}
    c, i, d = ([row[n] for row in part] for n in range(3))
    return {(r[0], r[1]): int(r[2]) for r in await conn.fetch(_ADD, c, i, d)}


class PostgresCountStore:
    """Implements CountStore (see ``tally.store.ports``) over a ``PgCluster``."""

    def __init__(self, cluster: PgCluster, standby_reads: bool = False) -> None:
        self.cluster = cluster
        self.rolled_forward = 0  # intents finished on behalf of an earlier, interrupted call
        self.fenced_waits = 0  # batch attempts that waited for a move's count fence
        self.standby_reads = standby_reads

    def for_serving(self) -> PostgresCountStore:
        """The same store for the read path, whose ``get`` a standby may answer while a shard
        has no reachable primary. Workers keep the primary-only store: a value they read goes
        into the cache under a log version, so it must not be older than that version."""
        return PostgresCountStore(self.cluster, standby_reads=True)

    @property
    def map(self) -> ShardMap:
        """The shard map in force: re-read by the cluster when a move changes it."""
        return self.cluster.map

    async def start(self) -> None:
        await self.cluster.start()

    async def close(self) -> None:
        await self.cluster.close()

    async def get(self, keys: Sequence[CountKey]) -> dict[CountKey, int]:
        return await read_counts(self.cluster, set(keys), standby_ok=self.standby_reads)

    async def rollups(self, counter: str, item_type: str, dimension: str) -> dict[str, int]:
        rows = await self.cluster.fetch(
            COORDINATOR, "SELECT bucket, value FROM rollups WHERE counter = $1 AND item_type = $2 "
            "AND dimension = $3 ORDER BY bucket", counter, item_type, dimension)
        return {r[0]: int(r[1]) for r in rows}

    async def watermarks(self, consumer: str) -> dict[str, int]:
        await self.finish_intents(consumer)
        rows = await self.cluster.fetch(
            COORDINATOR, "SELECT source, seq FROM watermarks WHERE consumer = $1", consumer)
        return {r[0]: int(r[1]) for r in rows}

    async def apply_batch(self, batch: Batch, consumer: str,
                          expect: Mapping[str, int]) -> dict[CountKey, int] | None:
        deadline = time.monotonic() + COUNT_FENCE_WAIT_S
        pending = 0
        while True:
            epoch, shard_map = self.cluster.epoch, self.map
            parts: dict[int, Part] = defaultdict(list)
            for (counter, item), delta in sorted(batch.deltas.items()):
                parts[shard_map.db_of(item)].append((counter, item, delta))
            shards = {shard_map.shard_of(item) for _, item in batch.deltas}
            decide = functools.partial(self._decide, batch, consumer, expect, parts,
                                       (epoch, shards))
            decided = await self.cluster.retrying("apply_batch", decide)
            if decided is None:
                return None
            if isinstance(decided, _Decided):
                counts = dict(decided.counts)
                if decided.intent is not None:
                    counts.update(await self._roll_forward(consumer, decided.intent,
                                                           decided.parts))
                return counts
            if decided is _STALE_MAP:  # a move switched the map: route by the new one
                await self.cluster.refresh_map()
            elif decided is _FENCED:  # counts of a moving range: wait for the move's switch
                self.fenced_waits += 1
                if time.monotonic() > deadline:
                    raise Unavailable(f"consumer {consumer}: counts of moving logical shards "
                                      f"stayed fenced for {COUNT_FENCE_WAIT_S:.0f} s")
                await asyncio.sleep(0.05)
            else:
                pending += 1
                if pending > 3:
                    raise RuntimeError(f"consumer {consumer}: intents keep appearing; another "
                                       "process is applying the same consumer")
                await self.finish_intents(consumer)  # an interrupted earlier batch goes first

    async def _decide(self, batch: Batch, consumer: str, expect: Mapping[str, int],
                      parts: dict[int, Part], routed: tuple[int, set[int]]
                      ) -> _Decided | object | None:
        """``routed``: the shard map's epoch the parts were computed with, and the logical shards
        of the batch's items. The head row is read under a share lock, so a move that fences
        counts or switches the map waits for this transaction, and the next one sees it."""
        epoch, shards = routed
        async with self.cluster.connection(COORDINATOR) as conn, conn.transaction():
            row = await conn.fetchrow(_HEAD, consumer)
            if row is None:  # the consumer's first batch: its row, then the same lock
                await conn.execute("INSERT INTO consumers VALUES ($1, 0) ON CONFLICT DO NOTHING",
                                   consumer)
                row = await conn.fetchrow(_HEAD, consumer)
            last, stored_epoch, first, final = row
            if stored_epoch != epoch:
                return _STALE_MAP
            if first is not None and any(first <= s <= final for s in shards):
                return _FENCED
            intent_pending, sources, seqs = await conn.fetchrow(_STATE, consumer,
                                                                list(batch.positions))
            if intent_pending:
                return _PENDING
            stored = dict(zip(sources or [], seqs or [], strict=True))
            if any(stored.get(src, 0) != expect.get(src, 0) for src in batch.positions):
                return None
            local = parts.get(COORDINATOR, [])
            rollups = sorted((*k, v) for k, v in batch.rollups.items())
            marks = sorted(batch.positions.items())
            rows = await conn.fetch(_APPLY, *([r[n] for r in local] for n in range(3)),
                                    *([r[n] for r in rollups] for n in range(5)), consumer,
                                    [m[0] for m in marks], [m[1] for m in marks])
            counts = {(r[0], r[1]): int(r[2]) for r in rows}
            remote = {db: part for db, part in parts.items() if db != COORDINATOR and part}
            intent = None
            if remote:
                intent = int(last) + 1
                await conn.execute("UPDATE consumers SET last_intent = $2 WHERE consumer = $1",
                                   consumer, intent)
                await conn.execute("INSERT INTO intents VALUES ($1, $2, $3::jsonb)", consumer,
                                   intent, orjson.dumps({str(k): v for k, v in remote.items()})
                                   .decode())
            return _Decided(counts, intent, remote)

    async def _roll_forward(self, consumer: str, intent: int,
                            parts: dict[int, Part]) -> dict[CountKey, int]:
        """Apply an intent's parts to their databases (each at most once), then delete it."""
        def attempt(db: int, part: Part) -> Callable[[], Awaitable[dict[CountKey, int]]]:
            return lambda: self._apply_part(db, consumer, intent, part)

        done = await self.cluster.gather(
            {db: self.cluster.retrying("roll_forward", attempt(db, part))
             for db, part in parts.items()})
        async with self.cluster.connection(COORDINATOR) as conn:
            await conn.execute("DELETE FROM intents WHERE consumer = $1 AND intent = $2",
                               consumer, intent)
        return {k: v for counts in done.values() for k, v in counts.items()}

    async def _apply_part(self, db: int, consumer: str, intent: int,
                          part: Part) -> dict[CountKey, int]:
        async with self.cluster.connection(db) as conn, conn.transaction():
            await conn.execute("INSERT INTO applied_intents VALUES ($1, 0) ON CONFLICT DO NOTHING",
                               consumer)
            mark = await conn.fetchval("SELECT intent FROM applied_intents WHERE consumer = $1 "
                                       "FOR UPDATE", consumer)
            if mark >= intent:  # applied already (by us before a crash, or by another process)
                return {}
            counts = await add_counts(conn, part)
            await conn.execute("UPDATE applied_intents SET intent = $2 WHERE consumer = $1",
                               consumer, intent)
            return counts

    async def finish_intents(self, consumer: str) -> int:
        """Roll forward the consumer's pending intent, left by a crash or an unreachable shard."""
        rows = await self.cluster.fetch(
            COORDINATOR, "SELECT intent, parts FROM intents WHERE consumer = $1 ORDER BY intent",
            consumer)
        for row in rows:
            raw: dict[str, list[list[Any]]] = orjson.loads(row[1])
            parts = {int(db): [(c, i, int(d)) for c, i, d in part] for db, part in raw.items()}
            await self._roll_forward(consumer, int(row[0]), parts)
            self.rolled_forward += 1
        return len(rows)

    async def pending_intent_deltas(self, keys: set[CountKey]) -> dict[CountKey, int]:
        """Deltas decided (watermarks moved) but not yet in their database's counts."""
        rows = await self.cluster.fetch(COORDINATOR, "SELECT parts FROM intents")
        out: dict[CountKey, int] = defaultdict(int)
        for row in rows:
            for part in orjson.loads(row[0]).values():
                for c, i, d in part:
                    if (c, i) in keys:
                        out[(c, i)] += int(d)
        return dict(out)

