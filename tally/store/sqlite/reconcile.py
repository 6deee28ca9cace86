"""Recount toggle counters from the toggle records, in chunks, inside the counts writer's transaction.

The check is exact while writes continue: the transaction reads the toggle records and the change
log from one snapshot of the likes file, and the counts file is written by this writer alone, so
within it ``count table + log deltas after the watermark == recount``. A key that breaks it has
drifted, and repair sets the table so that it holds again (the aggregator then applies the log on
top).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from tally.core.model import CountKey
from tally.store.ports import Drift, ReconcileChunk


def _marks(values: Sequence[object]) -> str:
    return ",".join("?" * len(values))


def _rows(conn: sqlite3.Connection, sql: str, params: Sequence[object]) -> dict[CountKey, int]:
    return {(c, i): n for c, i, n in conn.execute(sql, params)}


def _summed(conn: sqlite3.Connection, sql: str, schemas: Sequence[str],
            params: Sequence[object]) -> dict[CountKey, int]:
    """``sql`` (naming ``{s}.`` tables) run on each shard's schema, its rows summed per key."""
    out: dict[CountKey, int] = {}
    for schema in schemas:
        for key, n in _rows(conn, sql.format(s=schema), params).items():
            out[key] = out.get(key, 0) + n
    return out


def _explicit(conn: sqlite3.Connection, schemas: Sequence[str], counters: list[str],
              items: Sequence[str]) -> tuple[dict[CountKey, int], dict[CountKey, int]]:
    where = f"counter IN ({_marks(counters)}) AND item IN ({_marks(items)})"
    params = [*counters, *items]
    actual = _summed(conn, "SELECT counter, item, count(*) FROM {s}.toggles WHERE state=1 AND "
                           f"{where} GROUP BY counter, item", schemas, params)
    stored = _rows(conn, f"SELECT counter, item, count FROM counts WHERE {where}", params)
    return actual, stored


def _scan(conn: sqlite3.Connection, schemas: Sequence[str], counters: list[str],
          after: tuple[str, str], limit: int
          ) -> tuple[dict[CountKey, int], dict[CountKey, int], CountKey | None]:
    # "+counter": the counter filter must not take the key; the range on (counter, item) does,
    # so each chunk seeks to where the last one stopped instead of rescanning from the start.
    where = f"+counter IN ({_marks(counters)}) AND (counter, item) > (?, ?)"
    params = [*counters, *after, limit]
    pages = [_rows(conn, f"SELECT counter, item, count(*) FROM {schema}.toggles WHERE state=1 "
                         f"AND {where} GROUP BY counter, item ORDER BY counter, item LIMIT ?",
                   params) for schema in schemas]
    stored = _rows(conn, f"SELECT counter, item, count FROM counts WHERE {where} "
                         "ORDER BY counter, item LIMIT ?", params)
    # Each scan stops at its own limit; the chunk ends where the first of them stopped.
    ends = [max(rows) for rows in (*pages, stored) if len(rows) == limit]
    actual: dict[CountKey, int] = {}
    for page in pages:
        for key, n in page.items():
            actual[key] = actual.get(key, 0) + n
    upper = min(ends) if ends else None
    if upper is not None:
        actual = {k: v for k, v in actual.items() if k <= upper}
        stored = {k: v for k, v in stored.items() if k <= upper}
    return actual, stored, upper


def reconcile_chunk(conn: sqlite3.Connection, logs: Sequence[tuple[str, int]],
                    counters: list[str], items: Sequence[str] | None,
                    after: tuple[str, str] | None, limit: int, repair: bool) -> ReconcileChunk:
    """``logs``: each shard of the like records as (its schema, the counts' watermark in its
    log); ``conn`` is the counts writer's, which has them all attached."""
    if not counters:
        return ReconcileChunk(checked=0)
    schemas = [schema for schema, _mark in logs]
    if items is not None:
        actual, stored = _explicit(conn, schemas, counters, items)
        keys = {(c, i) for c in counters for i in items}
        upper = None
    else:
        actual, stored, upper = _scan(conn, schemas, counters, after or ("", ""), limit)
        keys = set(actual) | set(stored)
    pending: dict[CountKey, int] = {}
    for schema, mark in logs:
        for key, d in _rows(conn, f"SELECT counter, item, sum(delta) FROM {schema}.changelog "
                                  "WHERE seq > ? GROUP BY counter, item", (mark,)).items():
            pending[key] = pending.get(key, 0) + d
    drifts = []
    for counter, item in sorted(keys):
        key = (counter, item)
        unapplied = pending.get(key, 0)
        seen, real = stored.get(key, 0) + unapplied, actual.get(key, 0)
        if seen == real:
            continue
        drifts.append(Drift(counter=counter, item=item, stored=seen, actual=real))
        if repair:
            conn.execute("INSERT INTO counts (item, counter, count) VALUES (?,?,?) "
                         "ON CONFLICT (counter, item) DO UPDATE SET count=excluded.count",
                         (item, counter, real - unapplied))
    return ReconcileChunk(checked=len(keys), drifts=drifts, next_after=upper)
