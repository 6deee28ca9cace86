"""Leases on shared work (log partitions, outbox shards) as PostgreSQL session advisory locks.

Why advisory locks: PostgreSQL is already the system of record, so this adds no engine; a session
lock is held exactly as long as its connection lives, so a process that dies (crash, kill -9,
OOM) loses its leases the moment the server sees the socket close, which on a kill is at once;
a hung host loses them after TCP keepalive (set on the lease connection). Takeover is then one
balancing period away (``period_s``, half a second by default).

Each process keeps one dedicated connection to the coordination database (the first PostgreSQL
DSN) for all its leases, and also holds a *member slot* lock, so the live members can be counted
(``pg_locks``) and the work shared out: each aims at ceil(keys / members) keys, takes free keys
while below that, and gives keys back (after stopping their work) while above it.

A lease alone is not enough: between losing its connection and noticing, a process may still
finish a round of work. What makes that late write harmless is the work's own fence (the
aggregator's conditional watermark update, the relay's idempotent publish), not the lease; the
lease is what keeps two processes from doing the same work all the time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg

log = logging.getLogger("tally.leases")

MAX_MEMBERS = 1024
_KEEPALIVE = {"tcp_keepalives_idle": "5", "tcp_keepalives_interval": "2",
              "tcp_keepalives_count": "3"}


def namespace(name: str) -> int:
    """A stable positive int4 naming a family of locks (advisory locks take two int4 keys)."""
    return zlib.crc32(name.encode()) & 0x7FFF_FFFF


@dataclass
class LeaseStats:
    held: int = 0
    members: int = 0
    acquired: int = 0
    released: int = 0
    lost: int = 0  # connection losses (every lease gone at once)


class LeaseSet:
    """Balances ``keys`` of one ``kind`` over the live members, calling back on gain and loss.

    ``on_gain(key)`` starts the key's work; ``on_loss(key)`` stops it and returns once it stopped.
    """

    def __init__(self, dsn: str, kind: str, keys: Sequence[str],
                 on_gain: Callable[[str], Awaitable[None]],
                 on_loss: Callable[[str], Awaitable[None]], period_s: float = 0.5) -> None:
        self.dsn = dsn
        self.kind = kind
        self.keys = list(keys)
        self.on_gain = on_gain
        self.on_loss = on_loss
        self.period_s = period_s
        self._ns = namespace(f"tally:{kind}")
        self._member_ns = namespace(f"tally:{kind}:members")
        self._index = {key: i for i, key in enumerate(self.keys)}  # every member has the same list
        self._conn: asyncpg.Connection | None = None
        self._slot: int | None = None
        self.held: set[str] = set()
        self.stats = LeaseStats()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"tally-leases-{self.kind}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for key in sorted(self.held):
            await self.on_loss(key)
        self.held.clear()
        await self._disconnect()

    async def _run(self) -> None:
        while True:
            try:
                await self.balance()
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                await self._lost(exc)
            await asyncio.sleep(self.period_s)

    async def _lost(self, exc: BaseException) -> None:
        """The lease connection failed: the server has released (or will release) every lock."""
        log.warning("lease connection lost; giving up every lease",
                    extra={"kind": self.kind, "held": sorted(self.held), "error": repr(exc)})
        for key in sorted(self.held):
            await self.on_loss(key)
        self.held.clear()
        await self._disconnect()
        self.stats.lost += 1

    async def _disconnect(self) -> None:
        conn, self._conn, self._slot = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2.0)
            if not conn.is_closed():
                conn.terminate()

    async def _connect(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self.dsn, timeout=5, server_settings=_KEEPALIVE)
        for slot in range(MAX_MEMBERS):
            if await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", self._member_ns, slot):
                self._conn, self._slot = conn, slot
                return conn
        await conn.close()
        raise OSError(f"more than {MAX_MEMBERS} {self.kind} members")

    async def balance(self) -> None:
        """One round: count members, then take or give back keys towards the fair share."""
        conn = self._conn or await self._connect()
        members = await asyncio.wait_for(conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid::int = $1 "
            "AND objsubid = 2 AND granted", self._member_ns), 5)
        members = max(int(members), 1)
        target = math.ceil(len(self.keys) / members)
        self.stats.members = members
        while len(self.held) > target:
            await self._give_back(conn, max(self.held))
        if len(self.held) < target:
            await self._take(conn, target)
        self.stats.held = len(self.held)

    async def _take(self, conn: asyncpg.Connection, target: int) -> None:
        start = (self._slot or 0) * target  # members start at different keys: fewer collisions
        order = self.keys[start % len(self.keys):] + self.keys[:start % len(self.keys)]
        for key in order:
            if len(self.held) >= target:
                return
            if key in self.held:
                continue
            if await asyncio.wait_for(conn.fetchval("SELECT pg_try_advisory_lock($1, $2)",
                                                    self._ns, self._index[key]), 5):
                self.held.add(key)
                self.stats.acquired += 1
                log.info("lease taken", extra={"kind": self.kind, "key": key})
                await self.on_gain(key)

    async def _give_back(self, conn: asyncpg.Connection, key: str) -> None:
        await self.on_loss(key)  # stop the work first, then let another member take it
        self.held.discard(key)
        self.stats.released += 1
        await asyncio.wait_for(conn.fetchval("SELECT pg_advisory_unlock($1, $2)", self._ns,
                                             self._index[key]), 5)
        log.info("lease given back", extra={"kind": self.kind, "key": key})
