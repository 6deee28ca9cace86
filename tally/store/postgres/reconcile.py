"""Recount toggle counters across shards (scatter-gather), report drift, repair it carefully.

Toggles live by user and counts by item, so the true count of an item is the sum, over every
database, of its on-toggles. Each database is read in one REPEATABLE READ snapshot: its on-toggles
and its outbox rows not yet published agree with each other. What the store can see of a key is
then ``count + unpublished outbox deltas + deltas of pending intents``.

The consistency caveat while writes continue: events already published but not yet applied (in
the event log, between relay and aggregator) are invisible here, and the databases' snapshots are
not one global cut. So a difference is only reported when it is *stable*: measured again after
``settle_s`` it must be identical (same recount, same stored count, same unpublished deltas).
A key that changed meanwhile is left for the next pass.

Repair never overwrites a count: it adds the correction with a compare-and-set on the count value
it measured, so a delta applied by an aggregator in between makes the repair skip that key rather
than fight it. A key with outbox rows older than ``stall_s`` is not repaired: the relay is stalled,
and a row it published but did not trim may already be in the count (counted twice here).
The remaining assumption, stated for operators: no published event stays unapplied longer than
``settle_s`` (check the event log's lag before ``tally reconcile --repair``).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from tally.core.model import CountKey
from tally.store.ports import Drift, ReconcileChunk
from tally.store.postgres.cluster import COORDINATOR, PgCluster, read_counts
from tally.store.postgres.counts import PostgresCountStore

# Only the toggles of the logical shards the database holds: during a move the target holds a
# copy of the moving range, and afterwards the source may still (until the move's cleanup).
_ON = ("SELECT counter, item, count(*) FROM toggles WHERE state AND counter = ANY($1::text[]) "
       "AND item = ANY($2::text[]) AND EXISTS (SELECT 1 FROM unnest($3::int[], $4::int[]) "
       "AS r(f, l) WHERE shard BETWEEN r.f AND r.l) GROUP BY counter, item")
_UNPUBLISHED = ("SELECT counter, item, sum(delta), min(ts) FROM outbox "
                "WHERE counter = ANY($1::text[]) AND item = ANY($2::text[]) GROUP BY counter, item")
_SCAN_TOGGLES = ("SELECT DISTINCT counter, item FROM toggles WHERE state AND counter = ANY($1) "
                 "AND (counter, item) > ($2, $3) ORDER BY counter, item LIMIT $4")
_SCAN_COUNTS = ("SELECT counter, item FROM counts WHERE counter = ANY($1) "
                "AND (counter, item) > ($2, $3) ORDER BY counter, item LIMIT $4")
_REPAIR = ("INSERT INTO counts (item, counter, count) VALUES ($1, $2, $3) "
           "ON CONFLICT (counter, item) DO UPDATE SET count = counts.count + $3 "
           "WHERE counts.count = $4 RETURNING count")


@dataclass(frozen=True)
class _Seen:
    actual: int
    count: int
    unpublished: int
    intents: int
    oldest_unpublished: float | None

    @property
    def stored(self) -> int:
        return self.count + self.unpublished + self.intents


class PostgresRecounter:
    """Implements Recounter (see ``tally.store.ports``) over a ``PgCluster``."""

    def __init__(self, cluster: PgCluster, counts: PostgresCountStore, settle_s: float = 2.0,
                 stall_s: float = 10.0) -> None:
        self.cluster = cluster
        self.counts = counts
        self.settle_s = settle_s
        self.stall_s = stall_s
        self.repaired = 0
        self.skipped_repairs = 0

    async def reconcile_chunk(self, counters: Sequence[str], items: Sequence[str] | None,
                              after: tuple[str, str] | None, limit: int,
                              repair: bool) -> ReconcileChunk:
        if not counters:
            return ReconcileChunk(checked=0)
        upper: CountKey | None = None
        if items is not None:
            keys = {(c, i) for c in counters for i in items}
        else:
            keys, upper = await self._scan(list(counters), after or ("", ""), limit)
        first = await self._measure(keys)
        suspects = {k for k, s in first.items() if s.stored != s.actual}
        if not suspects:
            return ReconcileChunk(checked=len(keys), next_after=upper)
        await asyncio.sleep(self.settle_s)
        second = await self._measure(suspects)
        drifts = []
        for key in sorted(suspects):
            seen = second[key]
            if seen != first[key]:
                continue  # moved meanwhile: in flight, not (yet) drift
            drifts.append(Drift(counter=key[0], item=key[1], stored=seen.stored, actual=seen.actual))
            if repair:
                await self._repair(key, seen)
        return ReconcileChunk(checked=len(keys), drifts=drifts, next_after=upper)

    async def _scan(self, counters: list[str], after: tuple[str, str],
                    limit: int) -> tuple[set[CountKey], CountKey | None]:
        """The next ``limit`` keys after ``after`` that have an on-toggle or a count anywhere."""
        async def scan(db: int) -> list[list[CountKey]]:
            async with self.cluster.connection(db) as conn:
                return [[(r[0], r[1]) for r in await conn.fetch(sql, counters, *after, limit)]
                        for sql in (_SCAN_TOGGLES, _SCAN_COUNTS)]

        done = await self.cluster.gather({db: scan(db) for db in range(self.cluster.databases)})
        lists = [rows for per_db in done.values() for rows in per_db]
        ends = [max(rows) for rows in lists if len(rows) == limit]
        keys = {k for rows in lists for k in rows}
        upper = min(ends) if ends else None
        if upper is not None:
            keys = {k for k in keys if k <= upper}
        return keys, upper

    async def _measure(self, keys: set[CountKey]) -> dict[CountKey, _Seen]:
        counters = sorted({c for c, _ in keys})
        items = sorted({i for _, i in keys})
        per_db = await self.cluster.gather(
            {db: self._snapshot(db, counters, items) for db in range(self.cluster.databases)})
        actual: dict[CountKey, int] = defaultdict(int)
        unpublished: dict[CountKey, int] = defaultdict(int)
        oldest: dict[CountKey, float] = {}
        for on, out in per_db.values():
            for r in on:
                actual[(r[0], r[1])] += int(r[2])
            for r in out:
                key = (r[0], r[1])
                unpublished[key] += int(r[2])
                oldest[key] = min(oldest.get(key, r[3]), r[3])
        stored = await read_counts(self.cluster, keys)
        intents = await self.counts.pending_intent_deltas(keys)
        return {k: _Seen(actual.get(k, 0), stored.get(k, 0), unpublished.get(k, 0),
                         intents.get(k, 0), oldest.get(k)) for k in keys}

    async def _snapshot(self, db: int, counters: list[str], items: list[str]
                        ) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
        held = self.cluster.map.owned(db)
        async with self.cluster.connection(db) as conn, conn.transaction(
                isolation="repeatable_read", readonly=True):
            return (await conn.fetch(_ON, counters, items, [f for f, _ in held],
                                     [last for _, last in held]),
                    await conn.fetch(_UNPUBLISHED, counters, items))

    async def _moving(self) -> bool:
        """Whether a shard move is in progress: it copies counts from a snapshot plus a log of
        changes, and a repair is not in that log's reach, so repairs wait for the move's end."""
        rows = await self.cluster.fetch(COORDINATOR, "SELECT 1 FROM shard_moves WHERE step NOT "
                                        "IN ('done', 'aborted') LIMIT 1")
        return bool(rows)

    async def _repair(self, key: CountKey, seen: _Seen) -> None:
        stalled = (seen.oldest_unpublished is not None
                   and seen.oldest_unpublished < time.time() - self.stall_s)
        if stalled or seen.intents or await self._moving():
            self.skipped_repairs += 1
            return
        correction = seen.actual - seen.stored
        counter, item = key
        async with self.cluster.connection(self.cluster.map.db_of(item)) as conn:
            row = await conn.fetchrow(_REPAIR, item, counter, correction, seen.count)
        if row is None:
            self.skipped_repairs += 1  # an aggregator moved the count: next pass decides
        else:
            self.repaired += 1
