"""What a region keeps about the others, on its PostgreSQL shards (``RegionStore``).

- The placement map of each epoch (database 0), immutable once written: a new epoch is a new row,
  and the highest epoch is the map in force.
- Replicas of other regions' like records: a remote toggle change is written into ``toggles`` in
  the user's database like a local one, but without an outbox row (it is replicated already) and
  only if it is newer than the record there (``updated_at``, the origin's decision time). That makes
  applying any set of changes in any order, any number of times, end in the same records: the
  aggregators call it at least once per remote change, before the counts' commit.
- The conflicts listed by a rejoin (database 0).
- No-op decisions: a toggle write that changed nothing, by a user this region decides for since
  a failover, moves the record's time (``record_noops``): the rejoin's rule then sees the user's
  newer intent and lists a late change of the failed region as a conflict instead of applying it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Sequence
from typing import Any

from tally.core.model import Event
from tally.core.regions import Placement
from tally.store.ports import Conflict, RecordState, ToggleKey
from tally.store.postgres.cluster import PgCluster

_UPSERT = (
    "INSERT INTO toggles AS t (counter, user_id, item, state, version, updated_at, shard) "
    "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[], $5::bigint[], "
    "$6::float8[], $7::int[]) "
    "ON CONFLICT (counter, user_id, item) DO UPDATE SET state = excluded.state, "
    "version = t.version + 1, updated_at = excluded.updated_at "
    "WHERE t.updated_at < excluded.updated_at")
# A probe per key, not a join: a generic plan made on small tables joined toggles by a full scan.
_RECORDS = (
    "SELECT t.counter, t.user_id, t.item, t.state, t.updated_at "
    "FROM unnest($1::text[], $2::text[], $3::text[]) AS k(c, u, i) CROSS JOIN LATERAL ("
    "SELECT * FROM toggles WHERE counter = k.c AND user_id = k.u AND item = k.i OFFSET 0) t")
# A no-op write recorded as a decision: the record's time moves on, its state only if the record
# is missing (an unlike of a like never received); a record in another state changed meanwhile,
# which was a decision already.
_NOOP = (
    "INSERT INTO toggles AS t (counter, user_id, item, state, version, updated_at, shard) "
    "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[], $5::bigint[], "
    "$6::float8[], $7::int[]) "
    "ON CONFLICT (counter, user_id, item) DO UPDATE SET updated_at = excluded.updated_at "
    "WHERE t.state = excluded.state AND t.updated_at < excluded.updated_at")
_FORCE = (
    "INSERT INTO toggles AS t (counter, user_id, item, state, version, updated_at, shard) "
    "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[], $5::bigint[], "
    "$6::float8[], $7::int[]) "
    "ON CONFLICT (counter, user_id, item) DO UPDATE SET state = excluded.state, "
    "version = t.version + 1, updated_at = excluded.updated_at")


class PostgresRegions:
    def __init__(self, cluster: PgCluster, toggles: Collection[str]) -> None:
        self.cluster = cluster
        self.toggles = frozenset(toggles)

    async def placement(self) -> Placement | None:
        rows = await self.cluster.fetch(
            0, "SELECT body FROM placement ORDER BY epoch DESC LIMIT 1")
        return Placement.from_json(json.loads(rows[0][0])) if rows else None

    async def put_placement(self, placement: Placement) -> bool:
        """Store a new epoch; False when that epoch exists already (it is never changed)."""
        status = await self.cluster.fetch(
            0, "INSERT INTO placement VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING epoch",
            placement.epoch, json.dumps(placement.to_json()))
        return bool(status)

    async def apply_remote(self, events: Sequence[Event]) -> int:
        """Write other regions' toggle changes into the local records where newer; returns how
        many events were toggle changes."""
        latest: dict[ToggleKey, Event] = {}
        for ev in events:
            if ev.counter in self.toggles and ev.user is not None:
                key = (ev.counter, ev.user, ev.item)
                if key not in latest or ev.ts > latest[key].ts:
                    latest[key] = ev
        rows = [(k, ev.delta > 0, ev.ts) for k, ev in latest.items()]
        await self._write(_UPSERT, rows)
        return len(latest)

    async def record_noops(self, states: Sequence[tuple[ToggleKey, bool, float]]) -> None:
        """Record writes that changed nothing as decisions at their time (no event: no count
        changes), so a rejoin knows the user acted in this epoch."""
        await self._write(_NOOP, states)

    async def force(self, states: Sequence[tuple[ToggleKey, bool, float]]) -> None:
        """Set records whatever they hold (a rejoin makes the loser of a conflict hold the
        winner's state)."""
        await self._write(_FORCE, states)

    async def _write(self, sql: str, rows: Sequence[tuple[ToggleKey, bool, float]]) -> None:
        groups = self.cluster.map.group(rows, lambda r: r[0][1])
        for db, part in sorted(groups.items()):
            part.sort(key=lambda r: r[0])  # one lock order for every writer
            cols: list[list[Any]] = [[r[0][0] for r in part], [r[0][1] for r in part],
                                     [r[0][2] for r in part], [r[1] for r in part],
                                     [1] * len(part), [r[2] for r in part],
                                     [self.cluster.map.shard_of(r[0][1]) for r in part]]
            async with self.cluster.connection(db) as conn:
                await conn.execute(sql, *cols)

    async def records(self, keys: Collection[ToggleKey]) -> dict[ToggleKey, RecordState]:
        out: dict[ToggleKey, RecordState] = {}
        for db, part in self.cluster.map.group(keys, lambda k: k[1]).items():
            rows = await self.cluster.fetch(db, _RECORDS, [k[0] for k in part],
                                            [k[1] for k in part], [k[2] for k in part])
            out.update({(r[0], r[1], r[2]): (r[3], r[4]) for r in rows})
        return out

    async def add_conflicts(self, conflicts: Sequence[Conflict]) -> None:
        now = time.time()
        async with self.cluster.connection(0) as conn:
            await conn.executemany(
                "INSERT INTO region_conflicts VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, "
                "$11) ON CONFLICT DO NOTHING",
                [(c.source, c.seq, c.counter, c.item, c.user, c.event_on, c.event_ts,
                  c.record_on, c.record_ts, c.epoch, now) for c in conflicts])

    async def conflicts(self) -> list[Conflict]:
        rows = await self.cluster.fetch(
            0, "SELECT source, seq, counter, item, user_id, event_on, event_ts, record_on, "
               "record_ts, epoch FROM region_conflicts ORDER BY listed_at, source, seq")
        return [Conflict(*r) for r in rows]
