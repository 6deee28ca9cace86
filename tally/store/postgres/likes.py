"""Toggle records on PostgreSQL shards, with a transactional outbox per database (LikeStore, Outbox).

Placement: a toggle lives in the database of its USER's logical shard, so has-liked for a feed is
one query on one database, and a viral item's writes spread over every database. An increment
lives in the database of its idempotency key (so a retry meets its first attempt), else of its item.

The outbox is the change log: every real change appends a row in the same transaction as the
toggle. Rows are numbered per *source*, one of ``outbox_slots`` slots per database (source name
``pg<db>.<slot>``). A transaction takes the next numbers of a random slot with an upsert on that
slot's head row, as its last statement before commit; the row lock makes the slot's numbering
follow commit order, so a relay reading ``seq > position`` never misses a row that commits late.
Several slots let that many transactions commit concurrently on one database.

A bulk spanning databases runs one transaction per database: all statements run first, then the
commits follow, and an error before any commit rolls every database back. Validation happened
before the store, so only an infrastructure failure during the commits themselves can leave some
databases committed; the write then fails (503) and the client retries: a toggle retried is a no-op
where it already took effect, and an increment with an idempotency key is counted once. (Increments
without a key are not retry-safe, in any backend.)

The count in each answer is read-your-writes: the stored count read before this transaction
began (so it cannot already contain this change) plus this request's own deltas on that key,
floored at zero. Other users' changes appear once the aggregators have applied them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from tally.core.errors import InvalidInput, Unavailable
from tally.core.model import CountKey, Event, IncrOp, Op, OpResult, ToggleOp
from tally.core.toggle import step
from tally.store.groupcommit import GroupCommit
from tally.store.postgres.batch import distinct_keys, write_toggles
from tally.store.postgres.cluster import PgCluster, ShardMoving, read_counts
from tally.store.postgres.single import Planned, write_one
from tally.store.shards import ShardMap

_MATERIALIZE = (
    "INSERT INTO toggles (counter, user_id, item, state, version, updated_at, shard) "
    "SELECT c, u, i, false, 0, $5, s FROM unnest($1::text[], $2::text[], $3::text[], $4::int[]) "
    "AS k(c, u, i, s) ORDER BY c, u, i ON CONFLICT DO NOTHING")
# Neither statement joins toggles: each connection keeps a generic plan, and one made on small
# tables joined by a full scan, paid by every bulk while the table grew. _LOCK probes each key
# (a lateral subquery that locks), in key order; _UPDATE writes rows _LOCK locked, found by the
# primary key of ON CONFLICT (they are locked, so none is missing and the INSERT never inserts).
_LOCK = (
    "SELECT t.counter, t.user_id, t.item, t.state "
    "FROM (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) AS k(c, u, i) "
    "ORDER BY c, u, i) k CROSS JOIN LATERAL (SELECT counter, user_id, item, state FROM toggles "
    "WHERE counter = k.c AND user_id = k.u AND item = k.i FOR UPDATE) t")
_UPDATE = (
    "INSERT INTO toggles AS t (counter, user_id, item, state, version, updated_at, shard) "
    "SELECT c, u, i, s, n, $6, sh FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[], "
    "$5::int[], $7::int[]) AS k(c, u, i, s, n, sh) ORDER BY c, u, i "
    "ON CONFLICT (counter, user_id, item) DO UPDATE "
    "SET state = excluded.state, version = t.version + excluded.version, "
    "updated_at = excluded.updated_at")
_IDEM = (
    "INSERT INTO idempotency (counter, key, expires_at) "
    "SELECT c, k, e FROM unnest($1::text[], $2::text[], $3::float8[]) AS x(c, k, e) ORDER BY c, k "
    "ON CONFLICT (counter, key) DO UPDATE SET expires_at = excluded.expires_at "
    "WHERE idempotency.expires_at < $4 RETURNING counter, key")
_TAKE_SEQ = (
    "INSERT INTO outbox_heads (source, seq) VALUES ($1, $2) ON CONFLICT (source) "
    "DO UPDATE SET seq = outbox_heads.seq + excluded.seq RETURNING seq")
_APPEND = (
    "INSERT INTO outbox (source, seq, shard, counter, item, user_id, delta, ts, region) "
    "SELECT $1, * FROM unnest($2::bigint[], $3::int[], $4::text[], $5::text[], $6::text[], "
    "$7::bigint[], $8::float8[], $9::text[])")
# Has-liked: a subquery per item, not a join (a generic plan made on small tables joined by a scan).
_HAS = ("SELECT k.item FROM unnest($3::text[]) AS k(item) WHERE (SELECT t.state FROM toggles t "
        "WHERE t.counter = $1 AND t.user_id = $2 AND t.item = k.item)")
# Several sources of one database in one round trip: each its own oldest rows after its position.
_PENDING = """
SELECT s.source, o.seq, o.counter, o.item, o.user_id, o.delta, o.ts, o.region
FROM unnest($1::text[], $2::bigint[]) AS s(source, after) CROSS JOIN LATERAL (
    SELECT seq, counter, item, user_id, delta, ts, region FROM outbox
    WHERE source = s.source AND seq > s.after ORDER BY seq LIMIT $3) AS o
ORDER BY s.source, o.seq
"""
# The relay's round: trim what the previous round published (rows at or below each position) and
# read what follows, in one round trip. The SELECT reads the statement's snapshot, from before the
# DELETE, but only rows after the positions, which the DELETE does not touch.
_TRIM_AND_PENDING = """
WITH trimmed AS (
    DELETE FROM outbox USING unnest($1::text[], $2::bigint[]) AS t(source, through)
    WHERE outbox.source = t.source AND outbox.seq <= t.through)
""" + _PENDING
_TRIM = ("DELETE FROM outbox USING unnest($1::text[], $2::bigint[]) AS t(source, through) "
         "WHERE outbox.source = t.source AND outbox.seq <= t.through")

ToggleKey = tuple[str, str, str]  # (counter, user, item)


def retry_safe(ops: Sequence[Op]) -> bool:
    """Whether running the ops again after an unknown outcome changes nothing more: a toggle sets
    a state; an increment is counted once only under an idempotency key."""
    return all(isinstance(op, ToggleOp) or op.idempotency_key is not None for op in ops)


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows -> one list per column, for ``unnest($1::type[], ...)`` parameters."""
    return [[row[i] for row in rows] for i in range(width)]


class PostgresLikeStore:
    """Implements LikeStore and Outbox (see ``tally.store.ports``) over a ``PgCluster``."""

    def __init__(self, cluster: PgCluster, outbox_slots: int = 4, region: str = "",
                 group_commit: bool = True) -> None:
        if outbox_slots < 1:
            raise InvalidInput("outbox_slots must be at least 1", "outbox_slots")
        # With regions, source names start with the origin region, so every region's consumers
        # keep their watermarks per origin (``<region>.pg<db>.<slot>``).
        self.prefix = f"{region}.pg" if region else "pg"
        self.cluster = cluster
        self.slots = outbox_slots
        # Single likes from concurrent requests share transactions (see tally/store/groupcommit.py).
        self.group: GroupCommit[Op, OpResult] | None = (
            GroupCommit(self._write_group, in_flight=2) if group_commit else None)

    @property
    def map(self) -> ShardMap:
        """The shard map in force: re-read by the cluster when a move changes it."""
        return self.cluster.map

    async def start(self) -> None:
        await self.cluster.start()

    async def close(self) -> None:
        if self.group is not None:
            await self.group.close()
        await self.cluster.close()

    # -- LikeStore ----------------------------------------------------------------------------

    def route(self, op: Op) -> str:
        """The key whose shard holds the op: the user for toggles; see the module docstring."""
        if isinstance(op, ToggleOp):
            return op.user
        return op.idempotency_key if op.idempotency_key is not None else op.item

    async def write(self, ops: Sequence[Op]) -> list[OpResult]:
        ops = list(ops)
        if not ops:
            return []
        op = ops[0]
        if len(ops) == 1 and isinstance(op, ToggleOp) and self.group is not None:
            return [await self.group.submit(self.map.db_of(op.user), op)]
        return await self._write(ops)

    async def _write_group(self, db: int, ops: Sequence[Op]
                           ) -> Sequence[OpResult | BaseException]:
        """One group-commit batch (every op's record in database ``db``, by the map in force).

        If one like's shard is being moved, its guard refuses the whole transaction: the batch
        is then written like by like, so that only the likes of the moving shard fail (503)."""
        try:
            return await self._write(ops)
        except ShardMoving:
            if len(ops) == 1:
                raise
        alone = await asyncio.gather(*(self._write([op]) for op in ops), return_exceptions=True)
        return [r if isinstance(r, BaseException) else r[0] for r in alone]

    async def _write(self, ops: Sequence[Op]) -> list[OpResult]:
        ops, now = list(ops), time.time()
        toggles = [op for op in ops if isinstance(op, ToggleOp)]
        dbs = {self.map.db_of(op.user) for op in toggles}
        if len(ops) == 1:
            planned, counts = await self._write_single(ops[0], now)
        elif len(toggles) == len(ops) and len(dbs) == 1 and distinct_keys(toggles):
            planned, counts = await self._write_toggles(dbs.pop(), toggles, now)
        else:
            groups = self.map.group(range(len(ops)), lambda i: self.route(ops[i]))
            # Read before writing, never while a transaction holds a connection: a transaction
            # waiting for a second connection of a drained pool would never give its own back.
            counts = await read_counts(self.cluster, {(o.counter, o.item) for o in ops})
            planned = await self.cluster.retrying("write",
                                                  lambda: self._write_all(ops, groups, now),
                                                  retry_safe(ops))
        overlay: dict[CountKey, int] = defaultdict(int)
        results = []
        for i, op in enumerate(ops):
            p = planned[i]
            key = (op.counter, op.item)
            overlay[key] += p.delta
            results.append(OpResult(changed=p.changed, count=max(counts.get(key, 0) + overlay[key], 0),
                                    state=p.state, seq=p.seq))
        return results

    async def _write_single(self, op: Op, now: float
                            ) -> tuple[dict[int, Planned], dict[CountKey, int]]:
        key, item_key = self.route(op), (op.counter, op.item)
        db = self.map.db_of(key)
        here = self.map.db_of(op.item) == db  # the statement reads the count itself
        counts = {} if here else await read_counts(self.cluster, {item_key})

        async def attempt() -> tuple[Planned, int]:
            async with self.cluster.connection(db) as conn:
                return await write_one(conn, op, self._source(db), self.map.shard_of(key), now)

        planned, stored = await self.cluster.retrying("write", attempt, retry_safe([op]))
        return {0: planned}, ({item_key: stored} if here else counts)

    async def _write_toggles(self, db: int, ops: list[ToggleOp], now: float
                             ) -> tuple[dict[int, Planned], dict[CountKey, int]]:
        """Toggles of distinct records, all in database ``db``: one statement (``batch.py``)."""
        elsewhere = {(op.counter, op.item) for op in ops if self.map.db_of(op.item) != db}
        counts = await read_counts(self.cluster, elsewhere) if elsewhere else {}
        shards = [self.map.shard_of(op.user) for op in ops]

        async def attempt() -> tuple[dict[int, Planned], dict[CountKey, int]]:
            async with self.cluster.connection(db) as conn:
                return await write_toggles(conn, ops, shards, self._source(db), now)

        planned, here = await self.cluster.retrying("write", attempt, True)
        counts.update((key, n) for key, n in here.items() if key not in elsewhere)
        return planned, counts

    def _source(self, db: int) -> str:
        """The outbox slot a transaction numbers its rows in: any one, so commits spread."""
        return f"{self.prefix}{db}.{random.randrange(self.slots)}"

    async def _write_all(self, ops: list[Op], groups: dict[int, list[int]],
                         now: float) -> dict[int, Planned]:
        """One transaction per database, each run to its end before the next database's starts.

        Connections, row locks and outbox slots are so taken in database order by every writer:
        a wait across databases, which no server could detect as a deadlock, cannot form a cycle.
        (Within one database PostgreSQL detects deadlocks; the whole write is then retried.)
        """
        async with contextlib.AsyncExitStack() as stack:
            conns = {db: await stack.enter_async_context(self.cluster.connection(db))
                     for db in sorted(groups)}
            txs = {}
            for db, conn in conns.items():
                txs[db] = conn.transaction()
                await txs[db].start()
            try:
                plans = {}
                for db, conn in conns.items():  # in database order: see _write_all's docstring
                    plans[db] = await self._apply(conn, db, [(i, ops[i]) for i in groups[db]],
                                                  now)
            except BaseException:
                await _rollback(txs.values())
                raise
            await self._commit(txs)
        return {i: p for plan in plans.values() for i, p in plan.items()}

    @staticmethod
    async def _commit(txs: dict[int, Any]) -> None:
        pending = list(txs.items())
        for committed, (db, tx) in enumerate(pending):
            try:
                await tx.commit()
            except BaseException as exc:
                await _rollback(t for _, t in pending[committed + 1:])
                if committed:
                    raise Unavailable(f"bulk write committed on {committed} of {len(txs)} "
                                      f"databases, then database {db} failed: {exc!r}; "
                                      "retry it (toggles and keyed increments are idempotent)"
                                      ) from exc
                raise

    async def _apply(self, conn: asyncpg.Connection, db: int, ops: list[tuple[int, Op]],
                     now: float) -> dict[int, Planned]:
        planned: dict[int, Planned] = {}
        events: list[tuple[int, Op, int]] = []
        toggles = [(i, op) for i, op in ops if isinstance(op, ToggleOp)]
        if len(toggles) == len(ops) and distinct_keys([op for _, op in toggles]):
            # The usual bulk (likes of distinct records): the group-commit batch's one statement
            # (``batch.py``), in this database's transaction, instead of the replay's four
            # statements. The counts it reads are not needed: the caller read them before.
            done, _ = await write_toggles(conn, [op for _, op in toggles],
                                          [self.map.shard_of(op.user) for _, op in toggles],
                                          self._source(db), now)
            return {i: done[n] for n, (i, _) in enumerate(toggles)}
        incrs = [(i, op) for i, op in ops if isinstance(op, IncrOp)]
        if toggles:
            await self._toggles(conn, toggles, now, planned, events)
        if incrs:
            await self._incrs(conn, incrs, now, planned, events)
        if events:
            await self._append(conn, db, events, now, planned)
        return planned

    async def _toggles(self, conn: asyncpg.Connection, toggles: list[tuple[int, ToggleOp]],
                       now: float, planned: dict[int, Planned],
                       events: list[tuple[int, Op, int]]) -> None:
        """Lock the rows in key order, replay the ops in request order, write final states."""
        sets = sorted({(op.counter, op.user, op.item) for _, op in toggles if op.on})
        if sets:
            c, u, i = _columns(sets, 3)
            await conn.execute(_MATERIALIZE, c, u, i, [self.map.shard_of(x) for x in u], now)
        keys = sorted({(op.counter, op.user, op.item) for _, op in toggles})
        state: dict[ToggleKey, bool] = {(r[0], r[1], r[2]): r[3]
                                        for r in await conn.fetch(_LOCK, *_columns(keys, 3))}
        flips: dict[ToggleKey, int] = defaultdict(int)
        for idx, op in toggles:
            key = (op.counter, op.user, op.item)
            delta = step(state.get(key, False), op.on)
            if not delta:
                planned[idx] = Planned(False, 0, op.on)
                continue
            state[key] = op.on
            flips[key] += 1
            planned[idx] = Planned(True, delta, op.on)
            events.append((idx, op, delta))
        if flips:
            rows = [(*k, state[k], n) for k, n in sorted(flips.items())]
            await conn.execute(_UPDATE, *_columns(rows, 5), now,
                               [self.map.shard_of(k[1]) for k, _ in sorted(flips.items())])

    @staticmethod
    async def _incrs(conn: asyncpg.Connection, incrs: list[tuple[int, IncrOp]], now: float,
                     planned: dict[int, Planned], events: list[tuple[int, Op, int]]) -> None:
        windows = {(op.counter, op.idempotency_key): now + op.dedupe_window_s
                   for _, op in incrs if op.idempotency_key is not None}
        fresh: set[tuple[str, str]] = set()
        if windows:
            rows = sorted((c, k, exp) for (c, k), exp in windows.items() if k is not None)
            fresh = {(r[0], r[1]) for r in await conn.fetch(_IDEM, *_columns(rows, 3), now)}
        for idx, op in incrs:
            if op.idempotency_key is not None:
                key = (op.counter, op.idempotency_key)
                if key not in fresh:  # seen within the window (or earlier in this request)
                    planned[idx] = Planned(False, 0, None)
                    continue
                fresh.discard(key)
            planned[idx] = Planned(True, op.n, None)
            events.append((idx, op, op.n))

    async def _append(self, conn: asyncpg.Connection, db: int, events: list[tuple[int, Op, int]],
                      now: float, planned: dict[int, Planned]) -> None:
        source = self._source(db)
        last = await conn.fetchval(_TAKE_SEQ, source, len(events))
        first = last - len(events) + 1
        rows = []
        for n, (idx, op, delta) in enumerate(events):
            planned[idx].seq = first + n
            rows.append((first + n, self.map.shard_of(self.route(op)), op.counter, op.item,
                         op.user, delta, now, op.region))
        await conn.execute(_APPEND, source, *_columns(rows, 8))

    async def has(self, counter: str, user: str, items: Sequence[str]) -> list[bool]:
        if not items:
            return []
        rows = await self.cluster.read(
            self.map.db_of(user), _HAS,
            counter, user, list(items))
        on = {r[0] for r in rows}
        return [item in on for item in items]

    async def purge_idempotency(self) -> int:
        """Forget idempotency keys whose window has passed, in every database; returns how many."""
        removed = 0
        for db in range(self.cluster.databases):
            async with self.cluster.connection(db) as conn:
                status = await conn.execute("DELETE FROM idempotency WHERE expires_at < $1",
                                            time.time())
                removed += int(status.split()[-1])
        return removed

    # -- Outbox -------------------------------------------------------------------------------

    def sources(self) -> list[str]:
        return [s for db in range(self.cluster.databases) for s in self.sources_of(db)]

    def sources_of(self, db: int) -> list[str]:
        """The outbox sources of one physical database (a relay may own a database)."""
        return [f"{self.prefix}{db}.{slot}" for slot in range(self.slots)]

    def _db_of_source(self, source: str) -> int:
        db, _, slot = source.removeprefix(self.prefix).partition(".")
        if not (source.startswith(self.prefix) and db.isdigit() and slot.isdigit()
                and int(db) < self.cluster.databases):
            raise InvalidInput(f"unknown outbox source {source!r}", "source")
        return int(db)

    def source_groups(self) -> list[list[str]]:
        return [self.sources_of(db) for db in range(self.cluster.databases)]

    async def pending(self, source: str, after_seq: int, limit: int) -> list[Event]:
        return (await self.pending_many({source: after_seq}, limit)).get(source, [])

    async def pending_many(self, after: Mapping[str, int], limit: int,
                           trim: bool = False) -> dict[str, list[Event]]:
        out: dict[str, list[Event]] = {}
        sql = _TRIM_AND_PENDING if trim else _PENDING
        for db, group in self._by_db(after).items():
            rows = await self.cluster.fetch(db, sql, list(group), list(group.values()), limit)
            for r in rows:
                out.setdefault(r[0], []).append(Event(r[1], r[2], r[3], r[4], r[5], r[6], r[7],
                                                      r[0]))
        return out

    async def trim(self, source: str, through_seq: int) -> int:
        return await self.trim_many({source: through_seq})

    async def trim_many(self, through: Mapping[str, int]) -> int:
        removed = 0
        for db, group in self._by_db(through).items():
            async with self.cluster.connection(db) as conn:
                status = await conn.execute(_TRIM, list(group), list(group.values()))
            removed += int(status.split()[-1])
        return removed

    def _by_db(self, positions: Mapping[str, int]) -> dict[int, dict[str, int]]:
        out: dict[int, dict[str, int]] = {}
        for source, seq in positions.items():
            out.setdefault(self._db_of_source(source), {})[source] = seq
        return out

    async def outbox_head(self, source: str) -> int:
        rows = await self.cluster.fetch(self._db_of_source(source),
                                        "SELECT seq FROM outbox_heads WHERE source = $1", source)
        return int(rows[0][0]) if rows else 0


async def _rollback(txs: Any) -> None:
    for tx in txs:
        with contextlib.suppress(Exception):
            await tx.rollback()
