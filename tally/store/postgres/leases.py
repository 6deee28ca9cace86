"""Leases as PostgreSQL session advisory locks (the ``Leases`` port).

Why advisory locks: PostgreSQL is already the system of record, so this adds no engine; a session
lock is held exactly as long as its connection lives, so a process that dies (crash, kill -9,
OOM) loses its leases the moment the server sees the socket close, which on a kill is at once;
a hung host loses them after TCP keepalive (set on the lease connection).

A session is one dedicated connection to the coordination database (the first PostgreSQL DSN)
holding a *member slot* lock, so the live members of a family can be counted (``pg_locks``), and
the lease locks it takes. Advisory locks take two int4 keys: (family, slot) and (family, index).
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import Iterator
from typing import Any

import asyncpg

from tally.core.errors import Unavailable

MAX_MEMBERS = 1024
_KEEPALIVE = {"tcp_keepalives_idle": "5", "tcp_keepalives_interval": "2",
              "tcp_keepalives_count": "3"}
_TIMEOUT_S = 5.0


def namespace(name: str) -> int:
    """A stable positive int4 naming a family of locks."""
    return zlib.crc32(name.encode()) & 0x7FFF_FFFF


@contextlib.contextmanager
def _lost() -> Iterator[None]:
    """The session's connection failed: to the caller that is a lost session, whatever the cause."""
    try:
        yield
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise Unavailable(f"lease session lost: {exc!r}") from exc


class PgLeases:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def session(self, kind: str) -> PgLeaseSession:
        with _lost():
            conn = await asyncpg.connect(self.dsn, timeout=_TIMEOUT_S, server_settings=_KEEPALIVE)
        session = PgLeaseSession(conn, kind)
        try:
            await session.join()
        except BaseException:
            await session.close()
            raise
        return session


class PgLeaseSession:
    def __init__(self, conn: asyncpg.Connection, kind: str) -> None:
        self._conn = conn
        self._ns = namespace(f"tally:{kind}")
        self._member_ns = namespace(f"tally:{kind}:members")
        self.kind = kind
        self.slot = -1

    async def _fetchval(self, sql: str, *args: int) -> Any:
        with _lost():
            return await asyncio.wait_for(self._conn.fetchval(sql, *args), _TIMEOUT_S)

    async def join(self) -> None:
        for slot in range(MAX_MEMBERS):
            if await self._fetchval("SELECT pg_try_advisory_lock($1, $2)", self._member_ns, slot):
                self.slot = slot
                return
        raise Unavailable(f"more than {MAX_MEMBERS} {self.kind} members")

    async def members(self) -> int:
        count = await self._fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid::int = $1 "
            "AND objsubid = 2 AND granted", self._member_ns)
        return int(count)

    async def try_take(self, index: int) -> bool:
        return bool(await self._fetchval("SELECT pg_try_advisory_lock($1, $2)", self._ns, index))

    async def give_back(self, index: int) -> None:
        await self._fetchval("SELECT pg_advisory_unlock($1, $2)", self._ns, index)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._conn.close(), 2.0)
        if not self._conn.is_closed():
            self._conn.terminate()

    def terminate(self) -> None:
        """Drop the connection at once, as a dying process would (for tests and tools)."""
        self._conn.terminate()
