"""Applies a batch of write operations to SQLite set-wise, on the writer's thread.

One statement per operation (read the toggle, write it, append to the log, read the count) held
the writer, and with it the GIL, for most of the cost of a like. Here a batch of any size takes
two lookups (the toggles it touches, the counts it answers with), the state changes are worked out
in Python in arrival order, and the writes go in a few multi-row inserts. The outcome is the
same as running the operations one by one: a later operation on the same toggle sees the earlier
one's result, and change-log sequence numbers follow the operations' order.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tally.core.model import CountKey, IncrOp, Op, OpResult, ToggleOp
from tally.core.toggle import step

SOURCE = "local"  # the change log of the embedded store (of its shard 0 of the like records)
ToggleKey = tuple[str, str, str]  # (counter, user, item)
CountsOf = Callable[[Sequence[CountKey]], dict[CountKey, int]]

_UPSERT = ("INSERT INTO toggles (counter, user, item, state, version, updated_at) VALUES {rows} "
           "ON CONFLICT (counter, item, user) DO UPDATE SET "
           "state=excluded.state, version=excluded.version, updated_at=excluded.updated_at")
_LOG = "INSERT INTO changelog (seq, counter, item, user, delta, ts, region) VALUES {rows}"
# Rows per multi-row statement: a few fixed sizes, so each shape is compiled once and cached.
_ROW_CHUNKS = (256, 64, 16, 4, 1)
_IDEM = ("INSERT INTO idempotency (counter, key, expires_at) VALUES (?,?,?) "
         "ON CONFLICT (counter, key) DO UPDATE SET expires_at=excluded.expires_at "
         "WHERE expires_at < ? RETURNING 1")
_CHUNK = 300  # rows per lookup statement: well under SQLite's bound on parameters


def _values(width: int, rows: int) -> str:
    """Placeholders of a VALUES list: ``rows`` tuples of ``width``."""
    one = "(" + ",".join("?" * width) + ")"
    return ",".join([one] * rows)


def _chunks(rows: Sequence[tuple[str, ...]]) -> Iterable[Sequence[tuple[str, ...]]]:
    for start in range(0, len(rows), _CHUNK):
        yield rows[start:start + _CHUNK]


def insert_rows(conn: sqlite3.Connection, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """Runs ``sql`` (with ``{rows}`` where its VALUES go) over ``rows``, many rows per statement.

    ``executemany`` steps once per row, and each step gives up the GIL and must win it back from
    whatever else runs in the process. One statement per chunk of rows steps once."""
    if not rows:
        return
    width, start = len(rows[0]), 0
    for size in _ROW_CHUNKS:
        while len(rows) - start >= size:
            part = rows[start:start + size]
            conn.execute(_statement(sql, width, size), [x for row in part for x in row])
            start += size


@functools.lru_cache(maxsize=64)
def _statement(sql: str, width: int, rows: int) -> str:
    """``sql`` with ``rows`` placeholder tuples of ``width``: built once per shape, not per job."""
    return sql.format(rows=",".join(["(" + ",".join("?" * width) + ")"] * rows))


def source_of(shard: int) -> str:
    """The change-log source of a shard of the like records, as watermarks name it."""
    return SOURCE if shard == 0 else f"{SOURCE}{shard}"


def watermark(conn: sqlite3.Connection, consumer: str | None, source: str = SOURCE) -> int:
    """How far the counts hold a log: ``consumer``'s position, or the furthest of any."""
    if consumer is None:
        row = conn.execute("SELECT max(seq) FROM watermarks WHERE source=?", (source,)).fetchone()
    else:
        row = conn.execute("SELECT seq FROM watermarks WHERE consumer=? AND source=?",
                           (consumer, source)).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def counts_at_watermark(reader: sqlite3.Connection, keys: Sequence[CountKey],
                        source: str = SOURCE) -> tuple[int, dict[CountKey, int]]:
    """The count table's values for ``keys`` and the watermark of ``source`` they hold, read in
    one transaction of ``reader``, so a writer can add exactly the deltas after it."""
    reader.execute("BEGIN")
    try:
        return watermark(reader, None, source), stored_counts(reader, keys)
    finally:
        reader.execute("COMMIT")


def trim_log(conn: sqlite3.Connection, _tx: object, through_seq: int) -> int:
    """A likes writer's job: the applied events leave its change log; returns how many."""
    return conn.execute("DELETE FROM changelog WHERE seq <= ?", (through_seq,)).rowcount


def purge_idempotency(conn: sqlite3.Connection, _tx: object) -> int:
    """A likes writer's job: idempotency keys whose window has passed go; returns how many."""
    return conn.execute("DELETE FROM idempotency WHERE expires_at < ?", (time.time(),)).rowcount


def log_head(conn: sqlite3.Connection, schema: str = "main") -> int:
    """The newest change-log sequence number handed out (AUTOINCREMENT keeps it after a trim)."""
    row = conn.execute(f"SELECT seq FROM {schema}.sqlite_sequence "
                       f"WHERE name='changelog'").fetchone()
    return int(row[0]) if row else 0


def toggle_states(conn: sqlite3.Connection, keys: Sequence[ToggleKey]) -> dict[ToggleKey,
                                                                                tuple[int, int]]:
    """(state, version) of each toggle that has a record; one indexed lookup per key."""
    found: dict[ToggleKey, tuple[int, int]] = {}
    for part in _chunks(keys):
        sql = (f"WITH v(c, u, i) AS (VALUES {_values(3, len(part))}) SELECT t.counter, t.user, "
               "t.item, t.state, t.version FROM v CROSS JOIN toggles t "
               "ON t.counter = v.c AND t.user = v.u AND t.item = v.i")
        for c, u, i, state, version in conn.execute(sql, [x for key in part for x in key]):
            found[(c, u, i)] = (state, version)
    return found


def stored_counts(conn: sqlite3.Connection, keys: Sequence[CountKey]) -> dict[CountKey, int]:
    """The count table's values for ``keys`` (absent keys are 0 and left out). Per counter, one
    statement seeks each item on the key (half the cost of joining a VALUES list) and returns
    only the item and its count: asking for every (counter, item) pair of the counters and items
    named, with the counter's name in every row and each row checked against the keys, cost a
    feed's 50 lookups a fifth more."""
    found: dict[CountKey, int] = {}
    by_counter: dict[str, list[str]] = {}
    for counter, item in keys:
        by_counter.setdefault(counter, []).append(item)
    for counter, items in by_counter.items():
        for start in range(0, len(items), _CHUNK):
            part = items[start:start + _CHUNK]
            for item, n in conn.execute(_counts_of(len(part)), [counter, *part]):
                found[(counter, item)] = n
    return found


@functools.lru_cache(maxsize=64)
def _counts_of(items: int) -> str:
    return f"SELECT item, count FROM counts WHERE counter=? AND item IN ({','.join('?' * items)})"


def count_keys_of(ops: Sequence[Op]) -> list[CountKey]:
    """The count keys ``ops`` touch, once each, in order: what ``apply_ops`` asks
    ``counts_of`` for."""
    return list(dict.fromkeys((op.counter, op.item) for op in ops))


def apply_ops(conn: sqlite3.Connection, ops: Sequence[Op], counts_of: CountsOf,
              now: float) -> tuple[list[OpResult], dict[CountKey, int]]:
    """Runs ``ops`` in order inside the open transaction.

    Returns a result per operation and the deltas the batch added per count key (for the
    writer's pending overlay). ``counts_of`` answers the exact counts before this batch (the
    count table plus the deltas logged and not yet in it), so each answer is exact, its own change
    included."""
    touched = list(dict.fromkeys((op.counter, op.user, op.item) for op in ops
                                 if isinstance(op, ToggleOp)))
    states = toggle_states(conn, touched) if touched else {}
    count_keys = count_keys_of(ops)
    before = counts_of(count_keys)
    seq = log_head(conn)

    finals: dict[ToggleKey, tuple[int, int]] = {}  # toggles whose record changes
    log: list[tuple[Any, ...]] = []
    overlay: dict[CountKey, int] = {}
    results: list[OpResult] = []
    for op in ops:
        delta = 0
        if isinstance(op, ToggleOp):
            key = (op.counter, op.user, op.item)
            state, version = states.get(key, (0, 0))
            delta = step(bool(state), op.on)
            if delta:
                states[key] = finals[key] = (int(op.on), version + 1)
        elif _accept(conn, op, now):
            delta = op.n
        ckey = (op.counter, op.item)
        if delta:
            seq += 1
            log.append((seq, op.counter, op.item, op.user, delta, now, op.region))
            overlay[ckey] = overlay.get(ckey, 0) + delta
        count = before.get(ckey, 0) + overlay.get(ckey, 0)
        results.append(OpResult(changed=bool(delta), count=count,
                                state=op.on if isinstance(op, ToggleOp) else None,
                                seq=seq if delta else None))
    if finals:
        insert_rows(conn, _UPSERT, [(c, u, i, s, v, now) for (c, u, i), (s, v) in finals.items()])
    if log:
        insert_rows(conn, _LOG, log)
    return results, overlay


def _accept(conn: sqlite3.Connection, op: IncrOp, now: float) -> bool:
    """An increment counts unless its idempotency key was seen within the counter's window."""
    if op.idempotency_key is None:
        return True
    fresh = conn.execute(_IDEM, (op.counter, op.idempotency_key, now + op.dedupe_window_s,
                                 now)).fetchone()
    return fresh is not None
