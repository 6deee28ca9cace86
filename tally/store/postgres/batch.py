"""Many toggles of one database in one statement: what a group-commit batch usually is.

The general path (``likes.py``) replays a bulk in order over five statements, and writes a new
like twice (materialised as off, then switched on: two heap tuples and two sets of index entries).
A batch whose toggles are all of different (counter, user, item) needs no replay: each one is
``tally.core.toggle.step`` on its own row, which ``single.py``'s statement already does in SQL.
This is that statement over arrays: new likes are inserted on (``ON CONFLICT ... WHERE NOT
state`` for the ones that exist), unlikes switch off only rows that are on; the rows that changed
take consecutive numbers of one outbox slot (its head row locked last, as everywhere) and get
their outbox rows; the same statement reads the stored counts of the items. One round trip and
one commit for the whole batch.

No part of the statement joins a table: a connection keeps the statement's generic plan, and a
plan made while the tables were small (a new database) joined them by a full scan, which every
batch then paid in proportion to the table for the connection's life. So the stored counts are
read by a subquery per op, and an unlike first locks its row if it is on, by a lateral probe per
op (``lk``: rows off, or changed to off meanwhile, are skipped as the UPDATE's recheck skipped
them), then switches the locked rows off through ``ON CONFLICT``, whose conflict check is the
primary key itself. A row it locked cannot be gone, so that INSERT never inserts.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from tally.core.model import CountKey, ToggleOp
from tally.store.postgres.single import Planned

# $1..$7 the ops as arrays (counter, user, item, on, shard, region, position); $8 now; $9 the
# outbox source. Returns one row per op: its position, its outbox number if it changed (else
# NULL), and the stored count of its (counter, item) in this database (NULL if none).
TOGGLES = """WITH k AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[], $5::int[], $6::text[],
                         $7::int[]) AS k(c, u, i, s, shard, region, n)),
ins AS (
    INSERT INTO toggles AS t (counter, user_id, item, state, version, updated_at, shard)
    SELECT c, u, i, true, 1, $8, shard FROM k WHERE s ORDER BY c, u, i
    ON CONFLICT (counter, user_id, item) DO UPDATE
    SET state = true, version = t.version + 1, updated_at = excluded.updated_at
    WHERE NOT t.state RETURNING t.counter, t.user_id, t.item),
lk AS (
    SELECT k.* FROM (SELECT * FROM k WHERE NOT s ORDER BY c, u, i) k CROSS JOIN LATERAL (
        SELECT FROM toggles t WHERE t.counter = k.c AND t.user_id = k.u AND t.item = k.i
        AND t.state IS TRUE FOR UPDATE) x),
del AS (
    INSERT INTO toggles AS t (counter, user_id, item, state, version, updated_at, shard)
    SELECT c, u, i, false, 1, $8, shard FROM lk
    ON CONFLICT (counter, user_id, item) DO UPDATE
    SET state = false, version = t.version + 1, updated_at = excluded.updated_at
    WHERE t.state RETURNING t.counter, t.user_id, t.item),
ch AS (
    SELECT k.*, row_number() OVER (ORDER BY k.n) AS r, count(*) OVER () AS total
    FROM k JOIN (SELECT * FROM ins UNION ALL SELECT * FROM del) x
    ON x.counter = k.c AND x.user_id = k.u AND x.item = k.i),
h AS (
    INSERT INTO outbox_heads (source, seq) SELECT $9, count(*) FROM ch HAVING count(*) > 0
    ON CONFLICT (source) DO UPDATE SET seq = outbox_heads.seq + excluded.seq RETURNING seq),
numbered AS (SELECT ch.*, h.seq - ch.total + ch.r AS seq FROM ch, h),
o AS (
    INSERT INTO outbox (source, seq, shard, counter, item, user_id, delta, ts, region)
    SELECT $9, seq, shard, c, i, u, CASE WHEN s THEN 1 ELSE -1 END, $8, region FROM numbered)
SELECT k.n, numbered.seq,
       (SELECT count FROM counts WHERE counts.counter = k.c AND counts.item = k.i) FROM k
LEFT JOIN numbered ON numbered.n = k.n"""


def distinct_keys(ops: Sequence[ToggleOp]) -> bool:
    """Whether no two ops touch the same record (the one-statement batch needs it)."""
    return len({(op.counter, op.user, op.item) for op in ops}) == len(ops)


async def write_toggles(conn: asyncpg.Connection, ops: Sequence[ToggleOp], shards: Sequence[int],
                        source: str, now: float) -> tuple[dict[int, Planned], dict[CountKey, int]]:
    """Apply toggles of distinct records in one autocommit statement (see the module docstring).

    Returns what each op did, by position, and the stored counts this database holds for their
    (counter, item) as of just before the statement (absent where it holds none)."""
    rows = await conn.fetch(
        TOGGLES, [op.counter for op in ops], [op.user for op in ops], [op.item for op in ops],
        [op.on for op in ops], list(shards), [op.region for op in ops], list(range(len(ops))),
        now, source)
    planned: dict[int, Planned] = {}
    counts: dict[CountKey, int] = {}
    for n, seq, count in rows:
        op = ops[n]
        changed = seq is not None
        planned[n] = Planned(changed, (1 if op.on else -1) if changed else 0, op.on, seq)
        if count is not None:
            counts[(op.counter, op.item)] = int(count)
    return planned, counts
