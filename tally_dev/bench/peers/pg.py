"""Peer: naive PostgreSQL. A like row per (item, user) and a counter row per item.

Per like, one transaction: insert the like row (ON CONFLICT DO NOTHING) and, only if it was
inserted, add one to the item's counter row. It is written as one statement (data-modifying CTEs)
so it costs one round trip and one implicit transaction, as an expert would write it; durability is
the server's ``synchronous_commit=on`` with ``fsync=on``, equal to SQLite's ``synchronous=FULL``.
Its weakness under a viral item is inherent: every like of that item updates the same row, and the
row lock is held until the commit's WAL flush, so those likes commit one fsync at a time.

The pool releases a connection without asyncpg's default reset query (advisory unlocks, CLOSE ALL,
UNLISTEN, RESET ALL: four more statements and a round trip per like): the peer leaves no session
state behind, so a capable engineer would not pay for it (Tally's own pools do the same).
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

SCHEMA = """
CREATE TABLE IF NOT EXISTS likes (
    item    text NOT NULL,
    user_id text NOT NULL,
    PRIMARY KEY (item, user_id)
);
CREATE TABLE IF NOT EXISTS like_counts (
    item text PRIMARY KEY,
    n    bigint NOT NULL
);
"""

_FEED = """
SELECT i.item, coalesce(c.n, 0),
       EXISTS (SELECT 1 FROM likes l WHERE l.item = i.item AND l.user_id = $2)
FROM unnest($1::text[]) AS i(item) LEFT JOIN like_counts c ON c.item = i.item
"""

_LIKE = """
WITH ins AS (
    INSERT INTO likes (item, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING item
), upd AS (
    INSERT INTO like_counts (item, n) SELECT item, 1 FROM ins
    ON CONFLICT (item) DO UPDATE SET n = like_counts.n + 1 RETURNING n
)
SELECT (SELECT count(*) FROM ins) > 0,
       coalesce((SELECT n FROM upd), (SELECT n FROM like_counts WHERE item = $1), 0)
"""

_UNLIKE = """
WITH del AS (
    DELETE FROM likes WHERE item = $1 AND user_id = $2 RETURNING item
), upd AS (
    UPDATE like_counts SET n = n - 1 WHERE item IN (SELECT item FROM del) RETURNING n
)
SELECT (SELECT count(*) FROM del) > 0,
       coalesce((SELECT n FROM upd), (SELECT n FROM like_counts WHERE item = $1), 0)
"""


async def _keep_session(conn: asyncpg.Connection) -> None:
    """No reset on release: no SET, cursors, LISTEN or advisory locks are ever left behind
    (asyncpg still rolls back a transaction left open)."""


class PostgresPeer:
    def __init__(self, dsn: str, pool_size: int = 16) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the PostgreSQL peer is not started")
        return self._pool

    async def start(self) -> None:
        self._pool = await asyncpg.create_pool(self.dsn, min_size=self.pool_size,
                                               max_size=self.pool_size,
                                               reset=_keep_session)
        async with self.pool.acquire() as conn:
            await conn.execute(SCHEMA)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def toggle(self, item: str, user: str, on: bool) -> tuple[bool, int]:
        row = await self.pool.fetchrow(_LIKE if on else _UNLIKE, item, user)
        assert row is not None
        return bool(row[0]), int(row[1])

    async def counts(self, items: Sequence[str]) -> list[int]:
        rows = await self.pool.fetch("SELECT item, n FROM like_counts WHERE item = ANY($1::text[])",
                                     list(items))
        found = {r[0]: r[1] for r in rows}
        return [found.get(i, 0) for i in items]

    async def feed(self, user: str, items: Sequence[str]) -> list[tuple[int, bool]]:
        rows = await self.pool.fetch(_FEED, list(items), user)
        found = {r[0]: (int(r[1]), bool(r[2])) for r in rows}
        return [found[i] for i in items]
