"""The one-op write (a single like, unlike or view: most requests) as one statement, one round trip.

The general path (``postgres.py``) needs a transaction of several statements to replay a bulk in
order. One op needs none of that: a data-modifying CTE flips the toggle only if it changes
(``ON CONFLICT ... WHERE NOT state`` / ``UPDATE ... WHERE state``, which lock the row), takes the
next number of the outbox slot only if it did, and appends the outbox row, all in one autocommit
statement. Locks are taken in the same order as the general path (toggle row, then slot row), and
the slot row stays locked until the commit, so numbering still follows commit order. The same
statement reads the item's count as of its start, which spares a round trip when the item's
counts live in the database of the op.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from tally.core.model import IncrOp, Op, ToggleOp

_NEXT_SEQ = ("INSERT INTO outbox_heads (source, seq) SELECT $6, 1 FROM changed "
             "ON CONFLICT (source) DO UPDATE SET seq = outbox_heads.seq + 1 RETURNING seq")
_OUTBOX = ("o AS (INSERT INTO outbox (source, seq, shard, counter, item, user_id, delta, ts, region) "
           "SELECT $6, h.seq, $5, $1, $3, $2, $8, $4, $7 FROM h RETURNING seq) "
           # The count as of the statement's start: without this change, whatever it is.
           "SELECT (SELECT seq FROM o), (SELECT count FROM counts WHERE item = $3 AND counter = $1)")

# SET and CLEAR are tally.core.toggle.step in SQL, since one statement must decide and write:
# the row changes (and an outbox row is appended, delta +1 or -1) only when the state differs
# from the one asked for; a repeat matches no row and so logs nothing.
SET = f"""WITH changed AS (
    INSERT INTO toggles AS t (counter, user_id, item, state, version, updated_at, shard)
    VALUES ($1, $2, $3, true, 1, $4, $5)
    ON CONFLICT (counter, user_id, item) DO UPDATE
    SET state = true, version = t.version + 1, updated_at = excluded.updated_at
    WHERE NOT t.state RETURNING 1),
h AS ({_NEXT_SEQ}),
{_OUTBOX}"""

CLEAR = f"""WITH changed AS (
    UPDATE toggles SET state = false, version = version + 1, updated_at = $4
    WHERE counter = $1 AND user_id = $2 AND item = $3 AND state IS TRUE
    RETURNING 1),
h AS ({_NEXT_SEQ}),
{_OUTBOX}"""

KEYED = f"""WITH changed AS (
    INSERT INTO idempotency (counter, key, expires_at) VALUES ($1, $9, $10)
    ON CONFLICT (counter, key) DO UPDATE SET expires_at = excluded.expires_at
    WHERE idempotency.expires_at < $4 RETURNING 1),
h AS ({_NEXT_SEQ}),
{_OUTBOX}"""

UNKEYED = f"""WITH changed AS (SELECT 1),
h AS ({_NEXT_SEQ}),
{_OUTBOX}"""


@dataclass(slots=True)
class Planned:
    """What one op did: whether it changed anything, its delta, and its outbox number."""

    changed: bool
    delta: int
    state: bool | None
    seq: int | None = None


async def write_one(conn: asyncpg.Connection, op: Op, source: str, shard: int,
                    now: float) -> tuple[Planned, int]:
    """Apply one op in one statement (autocommit); see the module docstring.

    Also returns the item's stored count in this database as of just before the change (0 if
    none here): the answer's base when the item's counts live in the same database.
    """
    if isinstance(op, ToggleOp):
        delta = 1 if op.on else -1
        row = await conn.fetchrow(SET if op.on else CLEAR, op.counter, op.user, op.item, now,
                                  shard, source, op.region, delta)
        state: bool | None = op.on
    else:
        assert isinstance(op, IncrOp)
        delta, state = op.n, None
        common = (op.counter, op.user, op.item, now, shard, source, op.region, op.n)
        if op.idempotency_key is None:
            row = await conn.fetchrow(UNKEYED, *common)
        else:
            row = await conn.fetchrow(KEYED, *common, op.idempotency_key,
                                      now + op.dedupe_window_s)
    seq, count = row[0], row[1]
    changed = seq is not None
    return Planned(changed, delta if changed else 0, state, seq), int(count or 0)
