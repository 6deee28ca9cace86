"""Connection pools to every physical PostgreSQL database, the shard map, and the retry policy.

One ``PgCluster`` is shared by the like store, the count store and the recounter of a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from typing import Any, TypeVar

import asyncpg

from tally.core.errors import ConfigError, Unavailable
from tally.core.model import CountKey
from tally.store.postgres.schema import migrate
from tally.store.shards import ShardMap

log = logging.getLogger("tally.postgres")
T = TypeVar("T")

RETRYABLE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError,
             asyncpg.LockNotAvailableError)
UNREACHABLE = (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError,
               asyncpg.InterfaceError, asyncpg.InternalClientError, asyncpg.CannotConnectNowError,
               asyncpg.TooManyConnectionsError,
               # a server demoted under a connection (failover), or a standby reached before
               # its promotion: the primary is elsewhere, as after a lost connection
               asyncpg.ReadOnlySQLTransactionError, asyncpg.AdminShutdownError)


class Unreachable(Unavailable):
    """A database had no reachable primary: retried until ``failover_s`` when retry-safe."""


FENCED = "TL001"  # SQLSTATE of the write guard (schema.py, ``tally_guard``)
COORDINATOR = 0  # the database holding the shard map's epochs (and the aggregation's state)
# How often a process re-reads the shard map's epoch, if no notification came first (a move
# notifies MAP_CHANNEL when it switches the map); a move waits for every process to acknowledge a
# new epoch before the moved shards take writes again.
SHARD_MAP_POLL_S = 0.5
MAP_CHANNEL = "tally_shard_map"
HEARTBEAT_S = 5.0  # an unchanged epoch is acknowledged this often (the move's liveness test)


class ShardMoving(Unavailable):
    """A write met the guard of a logical shard that is being moved (or was, and this process had
    not yet re-read the map). Nothing was written; retry after a moment."""

    def __init__(self, message: str) -> None:
        super().__init__(message, None)
        self.headers = ((b"retry-after", b"1"),)


async def stored_map(conn: asyncpg.Connection, shards: int, databases: int,
                     initial: ShardMap) -> tuple[int, ShardMap]:
    """The coordinator's shard map in force and its epoch. The first process to start on fresh
    databases stores ``initial`` (the settings' map) as epoch 0; from then on the stored map wins,
    so a later change of the settings (a database appended to an even split) cannot move data
    under the processes' feet: moving is ``tally shards move``'s job."""
    row = await conn.fetchrow("SELECT h.epoch, m.ranges FROM shard_map_head h "
                              "LEFT JOIN shard_maps m ON m.epoch = h.epoch")
    if row is None or row[1] is None:
        await conn.execute("INSERT INTO shard_maps VALUES (0, $1, $2) ON CONFLICT (epoch) "
                           "DO NOTHING", initial.ranges(), time.time())
        row = await conn.fetchrow("SELECT 0, ranges FROM shard_maps WHERE epoch = 0")
    try:
        return int(row[0]), ShardMap.build(shards, databases, list(row[1]))
    except ConfigError as exc:
        raise ConfigError(f"the shard map stored on postgres_dsns[0] (epoch {row[0]}) does not "
                          f"fit the settings ({databases} databases, {shards} logical shards): "
                          f"{exc.message}") from exc


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release a pooled connection without asyncpg's reset query (a round trip per operation).

    The stores leave no session state behind: no SET, cursors, LISTEN or advisory locks (leases
    and the shard map's listener use connections of their own). asyncpg still rolls back a
    transaction left open.
    """


class PgCluster:
    """Pools to every physical database, the shard map, and the retry policy; shared by the stores.

    Started once however many stores use it (reference counted), so the like store, the count
    store and the recounter of one process share connections.
    """

    def __init__(self, dsns: Sequence[str], shard_map: ShardMap, pool_max: int = 10,
                 synchronous_commit: str = "on", retries: int = 5,
                 failover_s: float = 30.0, application_name: str = "tally") -> None:
        if len(dsns) != shard_map.databases:
            raise ConfigError(f"{len(dsns)} postgres_dsns but the shard map has "
                              f"{shard_map.databases} databases")
        self.dsns = list(dsns)
        self.map = shard_map
        self.pool_max = pool_max
        self.synchronous_commit = synchronous_commit
        self.retries = retries
        self.failover_s = failover_s
        self.application_name = application_name
        self.pools: list[asyncpg.Pool] = []
        self._standby_pools: dict[int, asyncpg.Pool | None] = {}
        self.standby_reads = 0  # reads served by a standby while a primary was unreachable
        self.retried = 0  # transactions run again after a deadlock or lock timeout
        self.unavailable = 0  # operations failed because a database was unreachable
        self.fenced = 0  # writes refused by a moving shard's guard
        self.map_reloads = 0  # new shard-map epochs adopted
        self.map_poll_failures = 0
        self.epoch = 0  # of the shard map in force (0: the settings' map)
        self._settings_map = shard_map
        self._map_loaded = False
        self.reader = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._poller: asyncio.Task[None] | None = None
        self._listener: asyncpg.Connection | None = None
        self._wake = asyncio.Event()
        self._acked_at = 0.0
        self._refreshed_at = 0.0
        self._users = 0
        self._lock = asyncio.Lock()

    @property
    def databases(self) -> int:
        return len(self.dsns)

    async def start(self) -> None:
        async with self._lock:
            self._users += 1
            if self._users > 1:
                return
            try:
                for index, dsn in enumerate(self.dsns):
                    pool = await asyncpg.create_pool(
                        dsn, min_size=1, max_size=self.pool_max, command_timeout=60,
                        timeout=5,  # connecting: a dead host is skipped for the next one
                        reset=_keep_session,
                        server_settings={"synchronous_commit": self.synchronous_commit,
                                         "lock_timeout": "10s",  # a safety net; then retried
                                         "application_name": self.application_name})
                    self.pools.append(pool)
                    async with pool.acquire() as conn:
                        await migrate(conn, index)
                await self.refresh_map()
                self._poller = asyncio.create_task(self._poll_map(), name="shard-map-poll")
            except BaseException:
                self._users -= 1
                await self._close_pools()
                raise
            log.info("postgres connected", extra={"databases": len(self.dsns),
                                                  "synchronous_commit": self.synchronous_commit})

    async def close(self) -> None:
        async with self._lock:
            self._users = max(self._users - 1, 0)
            if self._users == 0:
                await self._close_pools()

    async def refresh_map(self) -> bool:
        """Re-read the shard map's epoch (and the map, if it changed) from the coordinator, and
        acknowledge the epoch in force (a move waits for that) when it changed or every
        ``HEARTBEAT_S``. True if the map changed."""
        self._refreshed_at = time.monotonic()
        async with self.connection(COORDINATOR) as conn:
            head = await conn.fetchval("SELECT epoch FROM shard_map_head")
            changed = False
            if head != self.epoch or not self._map_loaded:
                epoch, new = await stored_map(conn, self.map.shards, self.databases,
                                              self._settings_map)
                changed = epoch != self.epoch or new.table != self.map.table
                self._map_loaded = True
            if changed:
                if epoch == 0 and self.map is self._settings_map:
                    log.warning("the shard_map setting differs from the stored map, which "
                                "stays in force (tally shards status shows it)",
                                extra={"stored": new.ranges()})
                self.map, self.epoch = new, epoch
                self.map_reloads += 1
                log.info("shard map adopted", extra={"epoch": epoch, "ranges": new.ranges()})
            if changed or time.monotonic() - self._acked_at >= HEARTBEAT_S:
                await conn.execute(
                    "INSERT INTO shard_map_readers VALUES ($1, $2, now()) ON CONFLICT (reader) "
                    "DO UPDATE SET epoch = excluded.epoch, seen_at = excluded.seen_at",
                    self.reader, self.epoch)
                self._acked_at = time.monotonic()
        return changed

    async def _poll_map(self) -> None:
        """Re-read the map when notified, else every ``SHARD_MAP_POLL_S``."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), SHARD_MAP_POLL_S)
            self._wake.clear()
            try:
                await self._listen()
                await self.refresh_map()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the coordinator unreachable: routes stay as they are
                self.map_poll_failures += 1
                log.warning("shard map poll failed", extra={"error": repr(exc)})

    async def _listen(self) -> None:
        """A connection of its own to the coordinator, listening for map switches (reopened by
        the next poll after it is lost)."""
        if self._listener is not None and not self._listener.is_closed():
            return
        self._listener = None
        conn = await asyncpg.connect(self.dsns[COORDINATOR], timeout=5,
                                     server_settings={"application_name": "tally-map-listener"})
        await conn.add_listener(MAP_CHANNEL, lambda *_: self._wake.set())
        self._listener = conn

    async def _close_pools(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(BaseException):
                await self._poller
            self._poller = None
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._listener.close(), 5)
            self._listener = None
        if self.pools and self._map_loaded:  # a move need not wait for a process that has left
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pools[COORDINATOR].execute(
                    "DELETE FROM shard_map_readers WHERE reader = $1", self.reader), 5)
        pools, self.pools = self.pools, []
        pools += [p for p in self._standby_pools.values() if p is not None]
        self._standby_pools.clear()
        for pool in pools:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), 10)

    def pool(self, db: int) -> asyncpg.Pool:
        if not self.pools:
            raise Unavailable("the PostgreSQL store is not started")
        return self.pools[db]

    @contextlib.asynccontextmanager
    async def connection(self, db: int) -> AsyncIterator[asyncpg.Connection]:
        pool = self.pool(db)
        try:
            async with pool.acquire(timeout=30) as conn:
                yield conn
        except UNREACHABLE as exc:
            self.unavailable += 1
            # The other idle connections point at the same lost server: replace them all now
            # rather than fail once on each.
            await pool.expire_connections()
            raise Unreachable(f"postgres database {db} is unreachable: {exc!r}") from exc

    async def fetch(self, db: int, sql: str, *args: Any) -> list[asyncpg.Record]:
        async def attempt() -> list[asyncpg.Record]:
            async with self.connection(db) as conn:
                rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
                return rows

        return await self.retrying("read", attempt)

    async def read(self, db: int, sql: str, *args: Any) -> list[asyncpg.Record]:
        """A read that a standby may answer while the database has no reachable primary.

        The standby of a synchronous pair has every acknowledged commit on disk, but may not
        have replayed the last few milliseconds of them: such a read can miss a write acknowledged
        just before the primary died. Without a standby in the DSN, it waits like ``fetch``.
        """
        try:
            async with self.connection(db) as conn:
                rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
                return rows
        except Unreachable:
            pool = await self._standby_pool(db)
            if pool is not None:
                with contextlib.suppress(*UNREACHABLE):
                    async with pool.acquire(timeout=5) as conn:
                        rows = await conn.fetch(sql, *args)
                        self.standby_reads += 1
                        return rows
        return await self.fetch(db, sql, *args)

    async def _standby_pool(self, db: int) -> asyncpg.Pool | None:
        """A small pool preferring a standby, for ``read``; None for a single-host DSN."""
        async with self._lock:  # one pool per database, however many readers ask at once
            if db in self._standby_pools:
                return self._standby_pools[db]
            dsn = self.dsns[db]
            if "target_session_attrs=read-write" not in dsn:
                self._standby_pools[db] = None
            else:
                self._standby_pools[db] = await asyncpg.create_pool(
                    dsn.replace("target_session_attrs=read-write",
                                "target_session_attrs=prefer-standby"),
                    min_size=0, max_size=2, command_timeout=10, timeout=5, reset=_keep_session,
                    server_settings={"application_name": "tally-standby-read"})
        return self._standby_pools[db]

    async def retrying(self, what: str, attempt: Callable[[], Awaitable[T]],
                       idempotent: bool = True) -> T:
        """Run a whole transaction again after a deadlock or serialization failure (bounded by
        ``retries``), or after losing the database's primary (bounded by ``failover_s``: the
        multi-host DSN reaches the promoted standby once the HA manager has promoted it).

        After a lost connection the transaction may have committed or not; only ``idempotent``
        work is run again (toggles set a state, increments with a key are counted once).
        """
        conflicts = 0
        deadline = time.monotonic() + self.failover_s
        pause = 0.1
        while True:
            try:
                return await attempt()
            except RETRYABLE as exc:
                conflicts = await self._conflict(what, exc, conflicts)
            except (*UNREACHABLE, Unreachable) as exc:
                if not isinstance(exc, Unreachable):
                    self.unavailable += 1
                left = deadline - time.monotonic()
                if not idempotent or left <= 0:
                    raise Unavailable(f"{what}: postgres unreachable: {exc!r}") from exc
                log.warning("postgres unreachable; retrying until a primary answers",
                            extra={"what": what, "error": repr(exc), "left_s": round(left, 1)})
                await asyncio.sleep(min(pause, left))
                pause = min(pause * 2, 1.0)
            except asyncpg.PostgresError as exc:
                if exc.sqlstate != FENCED:
                    raise
                await self._fenced(what, exc)

    async def _fenced(self, what: str, exc: asyncpg.PostgresError) -> None:
        """A write met a moving shard's guard (its transaction rolled back): adopt the newest map
        at once, so that the client's retry is routed by it, and answer 503 meanwhile."""
        self.fenced += 1
        if time.monotonic() - self._refreshed_at > 0.05:  # once for a burst of refusals
            with contextlib.suppress(Exception):
                await self.refresh_map()
        raise ShardMoving(f"{what}: {exc.args[0] if exc.args else exc}; retry") from exc

    async def _conflict(self, what: str, exc: Exception, conflicts: int) -> int:
        """A deadlock or serialization failure: pause briefly before the whole transaction runs
        again; give up after ``retries``."""
        self.retried += 1
        conflicts += 1
        if conflicts >= self.retries:
            raise Unavailable(f"{what}: gave up after {self.retries} attempts: {exc!r}") from exc
        log.warning("transaction retried", extra={"what": what, "error": repr(exc),
                                                  "left": self.retries - conflicts})
        await asyncio.sleep(0.005 * conflicts)
        return conflicts

    @staticmethod
    async def gather(per_db: dict[int, Awaitable[T]]) -> dict[int, T]:
        """Await one coroutine per database concurrently; the first error is raised after all end
        (so no connection is released, or rolled back, while a statement still runs on it)."""
        dbs = list(per_db)
        done = await asyncio.gather(*(per_db[db] for db in dbs), return_exceptions=True)
        out: dict[int, T] = {}
        for db, value in zip(dbs, done, strict=True):
            if isinstance(value, BaseException):
                raise value
            out[db] = value
        return out


# One primary-key probe per (counter, item) asked for, by a scalar subquery (a lateral one is
# flattened into a join, which a plan made on a small table runs as a hash join over a full
# scan). ``counter = ANY(..) AND item = ANY(..)`` was planned, generic and custom plans alike, as
# a bitmap scan of every count row of the counter, filtered by item: each bulk write, and each
# count read that missed the cache, read the whole table ("The planner trap" in
# docs/performance.md).
_COUNTS = ("SELECT k.c, k.i, (SELECT count FROM counts WHERE counter = k.c AND item = k.i) "
           "FROM unnest($1::text[], $2::text[]) AS k(c, i)")  # NULL: no count row


async def read_counts(cluster: PgCluster, keys: Collection[CountKey],
                      standby_ok: bool = False) -> dict[CountKey, int]:
    """Counts for the keys that have one: one query per database that holds some of the items
    (from a standby while a primary is unreachable, if ``standby_ok``)."""
    if not keys:
        return {}
    by_db: dict[int, list[CountKey]] = defaultdict(list)
    for key in sorted(set(keys)):
        by_db[cluster.map.db_of(key[1])].append(key)

    read = cluster.read if standby_ok else cluster.fetch
    rows = await cluster.gather({db: read(db, _COUNTS, [c for c, _ in part], [i for _, i in part])
                                 for db, part in by_db.items()})
    return {(r[0], r[1]): int(r[2]) for part in rows.values() for r in part if r[2] is not None}
