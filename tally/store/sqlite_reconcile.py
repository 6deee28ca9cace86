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


def _explicit(conn: sqlite3.Connection, counters: list[str],
              items: Sequence[str]) -> tuple[dict[CountKey, int], dict[CountKey, int]]:
    where = f"counter IN ({_marks(counters)}) AND item IN ({_marks(items)})"
    params = [*counters, *items]
    actual = _rows(conn, f"SELECT counter, item, count(*) FROM toggles WHERE state=1 AND {where} "
                         "GROUP BY counter, item", params)
    stored = _rows(conn, f"SELECT counter, item, count FROM counts WHERE {where}", params)
    return actual, stored


def _scan(conn: sqlite3.Connection, counters: list[str], after: tuple[str, str], limit: int
          ) -> tuple[dict[CountKey, int], dict[CountKey, int], CountKey | None]:
    # "+counter": the counter filter must not take the key; the range on (counter, item) does,
    # so each chunk seeks to where the last one stopped instead of rescanning from the start.
    where = f"+counter IN ({_marks(counters)}) AND (counter, item) > (?, ?)"
    params = [*counters, *after, limit]
    actual = _rows(conn, f"SELECT counter, item, count(*) FROM toggles WHERE state=1 AND {where} "
                         "GROUP BY counter, item ORDER BY counter, item LIMIT ?", params)
    stored = _rows(conn, f"SELECT counter, item, count FROM counts WHERE {where} "
                         "ORDER BY counter, item LIMIT ?", params)
    # Each scan stops at its own limit; the chunk ends where the first of them stopped.
    ends = [max(rows) for rows in (actual, stored) if len(rows) == limit]
    upper = min(ends) if ends else None
    if upper is not None:
        actual = {k: v for k, v in actual.items() if k <= upper}
        stored = {k: v for k, v in stored.items() if k <= upper}
    return actual, stored, upper


def reconcile_chunk(conn: sqlite3.Connection, watermark: int,
                    counters: list[str], items: Sequence[str] | None,
                    after: tuple[str, str] | None, limit: int, repair: bool) -> ReconcileChunk:
    if not counters:
        return ReconcileChunk(checked=0)
    if items is not None:
        actual, stored = _explicit(conn, counters, items)
        keys = {(c, i) for c in counters for i in items}
        upper = None
    else:
        actual, stored, upper = _scan(conn, counters, after or ("", ""), limit)
        keys = set(actual) | set(stored)
    pending = _rows(conn, "SELECT counter, item, sum(delta) FROM changelog WHERE seq > ? "
                          "GROUP BY counter, item", (watermark,))
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
