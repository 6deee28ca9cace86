"""Online resharding: move a range of logical shards to another PostgreSQL database while traffic
flows (``tally shards move FIRST-LAST --to DB``).

What moves: the toggle records of the range's users (``toggles.shard``), the idempotency keys
placed in it (by the key's shard) and the counts of its items (by the item's shard). What stays:
outbox rows, relayed from the source's outbox sources as before (relay positions are per source, so
nothing is published twice or skipped; moved users' later changes number in the target's sources),
and everything of database 0's coordinator role.

The steps, each recorded in the journal (``shard_moves`` on database 0) once done, so that a crashed
move resumes at its last finished step (run the same command again) or is aborted cleanly before
its switch (``tally shards abort``):

1. **copying** — on the source, *capture triggers* log the key of every change to the range
   (``move_changes``, written in the changing transaction itself); creating them waits for the
   writes in flight, so every change committed afterwards is logged. The target gets a *guard* that
   refuses the range (only the mover's own sessions may write it). Then a bulk copy from one
   REPEATABLE READ snapshot taken after the triggers, and rounds of catch-up: each takes logged
   keys off the log and copies their current rows, committing on the target before the source.
   Counts and idempotency keys carry no shard column: their triggers log every key, and the copy
   and the catch-up keep those of the range (hashed as the stores do). Then the count fence: the
   head row on database 0 names the range, so aggregators wait on those counts
   (``PostgresCountStore.apply_batch``); pending intents are rolled forward and the log is caught up
   through its last entry: the target now holds the range's counts exactly. Counts lag from here
   to the release; writes go on. (A reconcile repair waits for the move's end.)
2. **writes_fenced** — the source's guard now refuses the range too (SQLSTATE TL001: the write's
   transaction rolls back and the API answers 503 with Retry-After). Creating it waits for the writes
   in flight, so after it nothing of the range changes on the source: the last catch-up, through
   the log's last entry as of then, leaves the target equal to the source for the range. *Exact*: every change
   before the snapshot is in the copy, every change after it is in the log, none after the fence.
3. **switched** — one transaction on database 0 stores the new map under the next epoch and
   notifies ``MAP_CHANNEL``; every process listens there (and polls every ``SHARD_MAP_POLL_S`` in
   case a notification is lost, or at once after meeting a guard), adopts it and acknowledges it.
4. **released** — once every live process has acknowledged the epoch, the target's guard admits the
   range and the count fence is lifted. Until then both copies are equal and no write can change
   either, so a process still routing by the old map reads the same answers as one routing by the
   new map. The write pause of the range's users is fence to release.
5. **done** — the range's rows are deleted from the source. Its guard stays: a process that missed
   the epoch (cut off from database 0) still cannot change a moved user there.

Logical replication with a row filter was the first candidate for step 1; PostgreSQL 15 refuses an
UPDATE of a table published with a filter on a column outside its replica identity (``shard`` is
not in the primary key), so it would need ``REPLICA IDENTITY FULL`` (the whole old row in the WAL of
every like) or another unique index on the hottest table, plus ``wal_level=logical`` on every
primary; and counts and idempotency keys carry no shard column to filter on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from tally.core.errors import InvalidInput
from tally.store.postgres.cluster import (
    COORDINATOR,
    HEARTBEAT_S,
    MAP_CHANNEL,
    PgCluster,
)
from tally.store.postgres.counts import PostgresCountStore
from tally.store.shards import ShardMap, logical_shard

log = logging.getLogger("tally.reshard")

STEPS = ("copying", "writes_fenced", "switched", "released", "done")
# A process that has not acknowledged the map for this long (three heartbeats) is taken as gone:
# the move does not wait for it (the source's guard still stops it from changing a moved user).
READER_WINDOW_S = 3 * HEARTBEAT_S
_BATCH = 2000  # rows per copy transaction
_CAPTURED = ("toggles", "idempotency", "counts")
_PUT_ARG = {"idempotency": "idem", "counts": "counts"}
_MOVER_LOCK = 7_426_002  # advisory lock on database 0 held by the one running mover
_JOURNAL = ("UPDATE shard_moves SET step = $2, updated_at = $3, detail = $4::jsonb "
            "WHERE id = $1")
_CATCH_UP_SMALL = 500  # a catch-up round this small means the next one, fenced, is short
_CATCH_UP_ROUNDS = 20

_TOGGLE_COLUMNS = "counter, user_id, item, state, version, updated_at, shard"
_PUT_TOGGLES = (
    f"INSERT INTO toggles ({_TOGGLE_COLUMNS}) SELECT * FROM unnest($1::text[], $2::text[], "
    "$3::text[], $4::bool[], $5::bigint[], $6::float8[], $7::int[]) "
    "ON CONFLICT (counter, user_id, item) DO UPDATE SET state = excluded.state, "
    "version = excluded.version, updated_at = excluded.updated_at, shard = excluded.shard "
    "WHERE toggles.version <= excluded.version")
_PUT_IDEM = (
    "INSERT INTO idempotency (counter, key, expires_at) SELECT * FROM unnest($1::text[], "
    "$2::text[], $3::float8[]) ON CONFLICT (counter, key) DO UPDATE SET expires_at = "
    "excluded.expires_at")
_PUT_COUNTS = (
    "INSERT INTO counts (item, counter, count) SELECT * FROM unnest($1::text[], $2::text[], "
    "$3::bigint[]) ON CONFLICT (counter, item) DO UPDATE SET count = excluded.count")


@dataclass(frozen=True)
class Move:
    first: int
    last: int
    source: int
    target: int

    def describe(self) -> str:
        return (f"logical shards {self.first}-{self.last} from database {self.source} "
                f"to database {self.target}")


@dataclass
class MoveReport:
    """What a move did, with the timings an operator compares across moves."""

    move: Move
    id: int = 0
    epoch: int = 0
    copied: dict[str, int] = field(default_factory=dict)
    catch_up_rounds: int = 0
    caught_up_keys: int = 0
    fenced_keys: int = 0  # keys copied after the write fence (the last catch-up)
    copy_s: float | None = None  # the bulk copy (None when resumed past it)
    write_pause_s: float | None = None  # fence to release (None when resumed past the fence)
    count_pause_s: float | None = None
    # Where the write pause went: installing the source's guard (waiting for the writes in
    # flight), the last catch-up, the switch, the processes' acknowledgements, the release.
    pause_parts: dict[str, float] = field(default_factory=dict)
    fenced_at: float | None = None  # wall clock (time.time()) of the write fence and release
    released_at: float | None = None
    readers_waited: int = 0
    readers_gone: list[str] = field(default_factory=list)
    deleted: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "move": self.move.describe(), "epoch": self.epoch,
                "copied": self.copied, "catch_up_rounds": self.catch_up_rounds,
                "caught_up_keys": self.caught_up_keys, "fenced_keys": self.fenced_keys,
                "copy_s": self.copy_s,
                "write_pause_s": self.write_pause_s, "count_pause_s": self.count_pause_s,
                "pause_parts": self.pause_parts, "fenced_at": self.fenced_at,
                "released_at": self.released_at,
                "readers_waited": self.readers_waited, "readers_gone": self.readers_gone,
                "deleted": self.deleted}


class _Laps:
    """Durations of consecutive phases, in seconds, into ``parts``."""

    def __init__(self, parts: dict[str, float]) -> None:
        self.parts = parts
        self.at = time.monotonic()

    def start(self) -> float:
        self.at = time.monotonic()
        return self.at

    def __call__(self, name: str) -> None:
        now = time.monotonic()
        self.parts[name] = round(now - self.at, 4)
        self.at = now


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    return [[row[i] for row in rows] for i in range(width)]


def parse_range(text: str) -> tuple[int, int]:
    """'FIRST-LAST' or a single shard number -> (first, last)."""
    first, sep, last = text.strip().partition("-")
    if not first.strip().isdigit() or (sep and not last.strip().isdigit()):
        raise InvalidInput(f"shard range {text!r} must look like FIRST-LAST (e.g. 0-255) or one "
                           "shard number", "range")
    return int(first), int(last) if sep else int(first)


class ShardMover:
    """Moves a range of logical shards between the databases of a ``PgCluster`` (see the module).

    ``progress`` receives one line per step and per copy batch (the CLI prints them).
    """

    def __init__(self, cluster: PgCluster,
                 progress: Callable[[str], None] = lambda line: None) -> None:
        self.cluster = cluster
        self.counts = PostgresCountStore(cluster)
        self.progress = progress

    # -- planning -----------------------------------------------------------------------------

    async def plan(self, first: int, last: int, target: int) -> Move:
        """Check a requested move against the current map; errors say what to do instead."""
        await self.cluster.refresh_map()
        shard_map = self.cluster.map
        active = await self.active()
        if active is not None:
            move = Move(active["first"], active["last"], active["source"], active["target"])
            if (move.first, move.last, move.target) != (first, last, target):
                raise InvalidInput(f"move {active['id']} ({move.describe()}) is in progress at "
                                   f"step {active['step']}: run it again to resume it, or "
                                   "'tally shards abort'", "range")
            return move
        if not 0 <= first <= last < shard_map.shards:
            raise InvalidInput(f"shard range {first}-{last}: shards must satisfy 0 <= FIRST <= "
                               f"LAST < {shard_map.shards} (logical_shards)", "range")
        if not 0 <= target < shard_map.databases:
            raise InvalidInput(f"unknown database {target}: postgres_dsns lists "
                               f"{shard_map.databases} (0-{shard_map.databases - 1})", "to")
        sources = sorted({shard_map.db_of_shard(s) for s in range(first, last + 1)})
        if len(sources) > 1:
            raise InvalidInput(f"shards {first}-{last} are on databases {sources}; move the "
                               "range of one source at a time (tally shards status shows the map)",
                               "range")
        if sources[0] == target:
            raise InvalidInput(f"shards {first}-{last} are already on database {target}", "to")
        return Move(first, last, sources[0], target)

    async def active(self) -> dict[str, Any] | None:
        rows = await self.cluster.fetch(
            COORDINATOR, "SELECT id, first_shard, last_shard, source, target, step, detail "
            "FROM shard_moves WHERE step NOT IN ('done', 'aborted')")
        if not rows:
            return None
        r = rows[0]
        return {"id": r[0], "first": r[1], "last": r[2], "source": r[3], "target": r[4],
                "step": r[5], "detail": orjson.loads(r[6])}

    async def history(self, limit: int = 20) -> list[dict[str, Any]]:
        rows = await self.cluster.fetch(
            COORDINATOR, "SELECT id, first_shard, last_shard, source, target, step, started_at, "
            "updated_at, detail FROM shard_moves ORDER BY id DESC LIMIT $1", limit)
        return [{"id": r[0], "range": f"{r[1]}-{r[2]}", "from": r[3], "to": r[4], "step": r[5],
                 "started_at": r[6], "updated_at": r[7], "detail": orjson.loads(r[8])}
                for r in rows]

    async def estimate(self, move: Move) -> dict[str, int]:
        """Rows the move would copy (the toggles exactly; the others after a hash scan)."""
        async with self.cluster.connection(move.source) as conn, conn.transaction(
                isolation="repeatable_read", readonly=True):
            toggles = await conn.fetchval("SELECT count(*) FROM toggles WHERE shard BETWEEN $1 "
                                          "AND $2", move.first, move.last)
            idem = len([r async for r in self._scan(conn, move, "idempotency")])
            counts = len([r async for r in self._scan(conn, move, "counts")])
        return {"toggles": int(toggles), "idempotency": idem, "counts": counts}

    # -- the move -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """One mover at a time (a session advisory lock on database 0, released with its
        connection, also when the process dies): running the command twice cannot interleave."""
        conn = await asyncpg.connect(self.cluster.dsns[COORDINATOR], timeout=10)
        try:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _MOVER_LOCK):
                raise InvalidInput("another tally shards process is moving or aborting right "
                                   "now; wait for it (tally shards status)", "range")
            yield
        finally:
            await conn.close()

    async def run(self, move: Move) -> MoveReport:
        async with self._exclusive():
            return await self._run(move)

    async def _run(self, move: Move) -> MoveReport:
        report = MoveReport(move)
        report.id, step = await self._journal_open(move)
        log.info("shard move", extra={"move": report.id, "step": step, "what": move.describe()})
        t_counts = t_fence = None
        lap = _Laps(report.pause_parts)
        if step == "copying":
            await self._prepare(move)
            t_copy = time.monotonic()
            await self._copy(move, report)
            report.copy_s = round(time.monotonic() - t_copy, 3)
            await self._catch_up(move, report, until=_CATCH_UP_SMALL)
            t_counts = time.monotonic()
            await self._fence_counts(move, report)
            t_fence = lap.start()
            report.fenced_at = time.time()
            await self._guard(move.source, self.cluster.map.moved(move.first, move.last,
                                                                   move.target))
            step = await self._advance(report, "writes_fenced")
            lap("fence")
        if step == "writes_fenced":
            report.fenced_keys = await self._catch_up_through(move, report)
            lap("last_catch_up")
            report.epoch = await self._switch(move, report)
            step = "switched"
            lap("switch")
        if step == "switched":
            await self._await_readers(report)
            lap("acknowledged")
            await self._release(move)
            report.released_at = time.time()
            lap("release")
            if t_fence is not None and t_counts is not None:
                now = time.monotonic()
                report.write_pause_s = round(now - t_fence, 4)
                report.count_pause_s = round(now - t_counts, 4)
            step = await self._advance(report, "released")
        if step == "released":
            await self._drop_capture(move)
            await self._cleanup(move, report)
            await self._advance(report, "done")
        return report

    async def abort(self) -> str:
        """Undo a move that has not switched the map; after the switch, move the range back."""
        async with self._exclusive():
            return await self._abort()

    async def _abort(self) -> str:
        active = await self.active()
        if active is None:
            return "no move in progress"
        move = Move(active["first"], active["last"], active["source"], active["target"])
        if STEPS.index(active["step"]) >= STEPS.index("switched"):
            raise InvalidInput(f"move {active['id']} has switched the map (step "
                               f"{active['step']}): run it again to finish it, then move the "
                               "range back if needed", "abort")
        await self._drop_capture(move)
        await self._guard(move.source, self.cluster.map)  # the source takes the range's writes
        await self._set_count_fence(None)
        await self._delete_range(move.target, move, "target")
        await self.cluster.fetch(COORDINATOR, "UPDATE shard_moves SET step = 'aborted', "
                                 "updated_at = $2 WHERE id = $1", active["id"], time.time())
        log.info("shard move aborted", extra={"move": active["id"], "what": move.describe()})
        return f"move {active['id']} ({move.describe()}) aborted; the source holds the range"

    # -- steps --------------------------------------------------------------------------------

    async def _journal_open(self, move: Move) -> tuple[int, str]:
        active = await self.active()
        if active is not None:
            self.progress(f"resuming move {active['id']} at step {active['step']}")
            return int(active["id"]), str(active["step"])
        now = time.time()
        rows = await self.cluster.fetch(
            COORDINATOR, "INSERT INTO shard_moves (first_shard, last_shard, source, target, step, "
            "started_at, updated_at) VALUES ($1, $2, $3, $4, 'copying', $5, $5) RETURNING id",
            move.first, move.last, move.source, move.target, now)
        return int(rows[0][0]), "copying"

    async def _advance(self, report: MoveReport, step: str) -> str:
        await self.cluster.fetch(COORDINATOR, _JOURNAL, report.id, step, time.time(),
                                 orjson.dumps(report.as_dict()).decode())
        log.info("shard move step", extra={"move": report.id, "step": step,
                                           "what": report.move.describe()})
        self.progress(f"step {step}")
        return step

    async def _prepare(self, move: Move) -> None:
        """Start (or restart) the copy: the target refuses the range to everyone but the mover and
        holds none of it; the source logs every change of it from now on."""
        await self._guard(move.target, self.cluster.map)
        await self._delete_range(move.target, move, "target")
        await self._ddl(move.source, [
            *(f"DROP TRIGGER IF EXISTS tally_capture ON {table}" for table in _CAPTURED),
            "TRUNCATE move_changes",
            "CREATE TRIGGER tally_capture AFTER INSERT OR UPDATE ON toggles FOR EACH ROW "
            f"WHEN (NEW.shard BETWEEN {move.first:d} AND {move.last:d}) "
            "EXECUTE FUNCTION tally_capture()",
            # no shard column: every key is logged, the mover keeps those of the range
            *(f"CREATE TRIGGER tally_capture AFTER INSERT OR UPDATE ON {table} FOR EACH ROW "
              "EXECUTE FUNCTION tally_capture()" for table in ("idempotency", "counts"))])
        self.progress("capturing changes of the range on the source")

    async def _drop_capture(self, move: Move) -> None:
        await self._ddl(move.source, [
            *(f"DROP TRIGGER IF EXISTS tally_capture ON {table}" for table in _CAPTURED),
            "TRUNCATE move_changes"])

    async def _guard(self, db: int, shard_map: ShardMap) -> None:
        """Make database ``db`` refuse writes of every logical shard ``shard_map`` does not place
        in it. Replacing the triggers waits for the writes in flight (and holds new ones for that
        moment): after this commits, no transaction writes a refused shard there."""
        runs = shard_map.not_owned(db)
        when = " OR ".join(f"NEW.shard BETWEEN {f:d} AND {last:d}" for f, last in runs)
        statements = []
        for table in ("toggles", "outbox"):
            statements.append(f"DROP TRIGGER IF EXISTS tally_guard ON {table}")
            if when:
                statements.append(f"CREATE TRIGGER tally_guard BEFORE INSERT OR UPDATE ON "
                                  f"{table} FOR EACH ROW WHEN ({when}) "
                                  "EXECUTE FUNCTION tally_guard()")
        await self._ddl(db, statements)

    async def _ddl(self, db: int, statements: Sequence[str]) -> None:
        """Replace triggers in one transaction. Its table locks wait for the writes in flight, and
        every new write of those tables (any shard) queues behind them meanwhile: a short
        ``lock_timeout`` bounds that stall when a long transaction is in the way, then retries."""
        for attempt in range(20):
            try:
                async with self.cluster.connection(db) as conn, conn.transaction():
                    await conn.execute("SET LOCAL lock_timeout = '500ms'")
                    for sql in statements:
                        await conn.execute(sql)
                return
            except asyncpg.LockNotAvailableError:
                log.warning("shard move: tables busy, retrying", extra={"db": db,
                                                                        "attempt": attempt})
                await asyncio.sleep(0.2)
        raise RuntimeError(f"shard move: the tables of database {db} stayed locked by long "
                           "transactions; run the move again later")

    async def _copy(self, move: Move, report: MoveReport) -> None:
        """The bulk copy, from one snapshot taken after the capture triggers exist."""
        report.copied = {"toggles": 0}
        async with self.cluster.connection(move.source) as conn, conn.transaction(
                isolation="repeatable_read", readonly=True):
            total = await conn.fetchval("SELECT count(*) FROM toggles WHERE shard BETWEEN $1 "
                                        "AND $2", move.first, move.last)
            batch: list[Sequence[Any]] = []
            shown = time.monotonic()
            cursor = conn.cursor(f"SELECT {_TOGGLE_COLUMNS} FROM toggles WHERE shard BETWEEN "
                                 "$1 AND $2", move.first, move.last, prefetch=_BATCH)
            async for row in cursor:
                batch.append(tuple(row))
                if len(batch) == _BATCH:
                    await self._put(move.target, toggles=batch)
                    report.copied["toggles"] += len(batch)
                    batch = []
                    if time.monotonic() - shown >= 1.0:
                        shown = time.monotonic()
                        self.progress(f"copied {report.copied['toggles']:,} of {total:,} "
                                      "toggles")
            if batch:
                await self._put(move.target, toggles=batch)
                report.copied["toggles"] += len(batch)
            for table in ("idempotency", "counts"):
                report.copied[table] = 0
                rows: list[Sequence[Any]] = []
                async for row in self._scan(conn, move, table):
                    rows.append(row)
                    if len(rows) == _BATCH:
                        await self._put(move.target, **{_PUT_ARG[table]: rows})
                        report.copied[table] += len(rows)
                        rows = []
                if rows:
                    await self._put(move.target, **{_PUT_ARG[table]: rows})
                    report.copied[table] += len(rows)
        self.progress(f"copied {report.copied['toggles']:,} toggles, "
                      f"{report.copied['idempotency']:,} idempotency keys and "
                      f"{report.copied['counts']:,} counts")

    async def _scan(self, conn: asyncpg.Connection, move: Move,
                    table: str) -> AsyncIterator[tuple[Any, ...]]:
        """Rows of ``table`` (idempotency or counts) whose key's logical shard is in the range:
        these tables carry no shard column, so the key is hashed here, as the stores do."""
        shards = self.cluster.map.shards
        sql, key = {"idempotency": ("SELECT counter, key, expires_at FROM idempotency", 1),
                    "counts": ("SELECT item, counter, count FROM counts", 0)}[table]
        async for row in conn.cursor(sql, prefetch=_BATCH):
            if move.first <= logical_shard(row[key], shards) <= move.last:
                yield tuple(row)

    async def _put(self, db: int, toggles: Sequence[Sequence[Any]] = (),
                   idem: Sequence[Sequence[Any]] = (), counts: Sequence[Sequence[Any]] = (),
                   conn: asyncpg.Connection | None = None) -> None:
        """Write copied rows on the target, past its guard (only this transaction is let through)."""
        async def write(c: asyncpg.Connection) -> None:
            async with c.transaction():
                await c.execute("SET LOCAL tally.copier = 'on'")
                if toggles:
                    await c.execute(_PUT_TOGGLES, *_columns(toggles, 7))
                if idem:
                    await c.execute(_PUT_IDEM, *_columns(idem, 3))
                if counts:
                    await c.execute(_PUT_COUNTS, *_columns(counts, 3))

        if conn is not None:
            await write(conn)
            return
        async with self.cluster.connection(db) as c:
            await write(c)

    async def _catch_up(self, move: Move, report: MoveReport, until: int) -> int:
        """Unfenced catch-up: copy the logged keys' current rows until a round takes ``until``
        keys or fewer (so that the fenced rounds that follow are short), at most
        ``_CATCH_UP_ROUNDS`` rounds."""
        moved = 0
        for _ in range(_CATCH_UP_ROUNDS):
            taken, _ = await self._drain(move)
            moved += taken
            report.catch_up_rounds += 1
            report.caught_up_keys += taken
            if taken <= until:
                break
        self.progress(f"caught up {moved:,} changed keys")
        return moved

    async def _drain(self, move: Move, limit: int = 5000) -> tuple[int, int]:
        """One catch-up round; returns (keys taken, highest log id taken). The keys leave the log
        in the source transaction that reads their rows, which commits only after the target has
        the rows: a crash in between copies them again (the copy is idempotent). A change
        committed after the read logs its key anew."""
        shards = self.cluster.map.shards

        def moving(key: str) -> bool:
            return move.first <= logical_shard(key, shards) <= move.last

        async with self.cluster.connection(move.source) as src, src.transaction():
            keys = await src.fetch(
                "DELETE FROM move_changes WHERE id IN (SELECT id FROM move_changes ORDER BY id "
                "LIMIT $1) RETURNING id, tbl, k1, k2, k3", limit)
            if not keys:
                return 0, 0
            toggle_keys = sorted({(k[2], k[3], k[4]) for k in keys if k[1] == "toggles"})
            idem_keys = sorted({(k[2], k[3]) for k in keys
                                if k[1] == "idempotency" and moving(k[3])})
            count_keys = sorted({(k[2], k[3]) for k in keys if k[1] == "counts" and moving(k[3])})
            toggles: list[tuple[Any, ...]] = []
            idem: list[tuple[Any, ...]] = []
            counts: list[tuple[Any, ...]] = []
            if toggle_keys:
                toggles = [tuple(r) for r in await src.fetch(
                    f"SELECT {', '.join('t.' + c.strip() for c in _TOGGLE_COLUMNS.split(','))} "
                    "FROM toggles t JOIN unnest($1::text[], $2::text[], $3::text[]) AS "
                    "k(c, u, i) ON t.counter = k.c AND t.user_id = k.u AND t.item = k.i",
                    *_columns(toggle_keys, 3))]
            if idem_keys:
                idem = [tuple(r) for r in await src.fetch(
                    "SELECT d.counter, d.key, d.expires_at FROM idempotency d JOIN "
                    "unnest($1::text[], $2::text[]) AS k(c, key) ON d.counter = k.c "
                    "AND d.key = k.key", *_columns(idem_keys, 2))]
            if count_keys:
                counts = [tuple(r) for r in await src.fetch(
                    "SELECT n.item, n.counter, n.count FROM counts n JOIN unnest($1::text[], "
                    "$2::text[]) AS k(c, i) ON n.counter = k.c AND n.item = k.i",
                    *_columns(count_keys, 2))]
            await self._put(move.target, toggles=toggles, idem=idem, counts=counts)
            return len(keys), max(int(k[0]) for k in keys)

    async def _catch_up_through(self, move: Move, report: MoveReport) -> int:
        """Catch up through the log's last entry as of now. Called once the range is fenced (its
        counts, or its writes): every change of the range is then in the log already, while the
        changes logged after it (keys of other shards: the idempotency and count triggers log every
        key) need not be waited for. Returns the keys taken."""
        rows = await self.cluster.fetch(move.source, "SELECT max(id) FROM move_changes")
        mark = rows[0][0] or 0
        moved = 0
        for _ in range(10_000):  # bounded: each round takes the oldest entries, up to the mark
            taken, highest = await self._drain(move)
            moved += taken
            report.catch_up_rounds += 1
            report.caught_up_keys += taken
            if taken == 0 or highest >= mark:
                break
        return moved

    async def _set_count_fence(self, move: Move | None) -> None:
        """Name (or clear) the range whose counts aggregators must not apply. The update waits for
        every apply in flight (they read the head row under a share lock)."""
        first, last = (move.first, move.last) if move else (None, None)
        await self.cluster.fetch(COORDINATOR, "UPDATE shard_map_head SET counts_fence_first = $1, "
                                 "counts_fence_last = $2", first, last)

    async def _fence_counts(self, move: Move, report: MoveReport) -> None:
        """Fence the range's counts, finish every batch decided before the fence (intents), then
        catch up the log through its last entry as of then: no count of the range changes on the
        source after that, so the target holds every one of them exactly."""
        await self._set_count_fence(move)
        consumers = await self.cluster.fetch(COORDINATOR,
                                             "SELECT DISTINCT consumer FROM intents")
        for row in consumers:
            await self.counts.finish_intents(row[0])
        await self._catch_up_through(move, report)
        self.progress("counts of the range fenced and caught up")

    async def _switch(self, move: Move, report: MoveReport) -> int:
        """Store the new map under the next epoch and journal the step, in one transaction on
        database 0 (a crash leaves either both or neither)."""
        new = self.cluster.map.moved(move.first, move.last, move.target)
        async with self.cluster.connection(COORDINATOR) as conn, conn.transaction():
            epoch = int(await conn.fetchval("SELECT epoch FROM shard_map_head FOR UPDATE")) + 1
            await conn.execute("INSERT INTO shard_maps VALUES ($1, $2, $3) ON CONFLICT (epoch) "
                               "DO UPDATE SET ranges = excluded.ranges", epoch, new.ranges(),
                               time.time())
            await conn.execute("UPDATE shard_map_head SET epoch = $1", epoch)
            report.epoch = epoch
            await conn.execute(_JOURNAL, report.id, "switched", time.time(),
                               orjson.dumps(report.as_dict()).decode())
            await conn.execute(f"NOTIFY {MAP_CHANNEL}")  # delivered at commit
        await self.cluster.refresh_map()
        log.info("shard map switched", extra={"epoch": epoch, "ranges": new.ranges()})
        self.progress(f"map switched to epoch {epoch}")
        return epoch

    async def _await_readers(self, report: MoveReport) -> None:
        """Wait until every process that polled the map lately routes by the new epoch."""
        deadline = time.monotonic() + READER_WINDOW_S + 1
        while True:
            rows = await self.cluster.fetch(
                COORDINATOR, "SELECT reader FROM shard_map_readers WHERE epoch < $1 AND "
                "seen_at > now() - make_interval(secs => $2)", self.cluster.epoch, READER_WINDOW_S)
            if not rows:
                break
            report.readers_waited = max(report.readers_waited, len(rows))
            if time.monotonic() > deadline:  # not seen for the whole window: gone
                report.readers_gone = [r[0] for r in rows]
                log.warning("shard move: processes never acknowledged the new map",
                            extra={"readers": report.readers_gone})
                break
            await asyncio.sleep(0.01)
        await self.cluster.fetch(COORDINATOR, "DELETE FROM shard_map_readers WHERE seen_at < "
                                 "now() - interval '1 hour'")

    async def _release(self, move: Move) -> None:
        await self._guard(move.target, self.cluster.map)
        await self._set_count_fence(None)
        self.progress("writes and counts of the range released on the target")

    async def _cleanup(self, move: Move, report: MoveReport) -> None:
        report.deleted = await self._delete_range(move.source, move, "source")
        self.progress(f"deleted the range from the source: {report.deleted}")

    async def _delete_range(self, db: int, move: Move, role: str,
                            tables: Sequence[str] = ("toggles", "idempotency", "counts")
                            ) -> dict[str, int]:
        """Delete a database's rows of the range, in bounded transactions."""
        deleted = dict.fromkeys(tables, 0)
        async with self.cluster.connection(db) as conn:
            while "toggles" in tables:
                status = await conn.execute(
                    "DELETE FROM toggles WHERE ctid = ANY(ARRAY(SELECT ctid FROM toggles WHERE "
                    "shard BETWEEN $1 AND $2 LIMIT $3))", move.first, move.last, _BATCH * 5)
                n = int(status.split()[-1])
                deleted["toggles"] += n
                if n == 0:
                    break
            for table, sql in (("idempotency", "DELETE FROM idempotency d USING unnest($1::text[], "
                                "$2::text[]) AS k(c, key) WHERE d.counter = k.c AND d.key = k.key"),
                               ("counts", "DELETE FROM counts n USING unnest($1::text[], "
                                "$2::text[]) AS k(i, c) WHERE n.item = k.i AND n.counter = k.c")):
                if table not in tables:
                    continue
                async with conn.transaction(isolation="repeatable_read", readonly=True):
                    keys = [row[:2] async for row in self._scan(conn, move, table)]
                for start in range(0, len(keys), _BATCH * 5):
                    part = keys[start:start + _BATCH * 5]
                    status = await conn.execute(sql, *_columns(part, 2))
                    deleted[table] += int(status.split()[-1])
        if any(deleted.values()):
            log.info("shard move deleted rows", extra={"db": db, "role": role, **deleted})
        return deleted
