"""Aggregation inside the embedded database: the change log and the counts share one SQLite file,
so a round is a few set-wise statements in one writer transaction instead of a Python object per
event read, summed and written back.

It is the same aggregator (``tally.core.coalesce`` defines the semantics; a test holds the two to
the same counts and rollups): read after the watermark, sum per (counter, item) and per rollup
bucket, drop zero sums, add, move the watermark, trim, all in one transaction. Under bulk likes the
per-event Python of the generic path (build an Event, sum it, bind it again) held the GIL for as
long as the writer's own work, and the GIL is what one process's writes are bounded by.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection

from tally.core.model import CountKey

# Events of one round, as a range of the log: (after, upto]. The subquery stops at ``limit`` rows.
_RANGE = ("SELECT count(*), max(seq), min(ts) FROM "
          "(SELECT seq, ts FROM changelog WHERE seq > ? ORDER BY seq LIMIT ?)")

_SUMS = ("SELECT counter, item, sum(delta) AS d FROM changelog WHERE seq > ? AND seq <= ? "
         "GROUP BY counter, item HAVING d != 0")

_ADD_COUNTS = ("INSERT INTO counts (counter, item, count) " + _SUMS + " "
               "ON CONFLICT (counter, item) DO UPDATE SET count = count + excluded.count "
               "RETURNING counter, item, count")

# split_item(): the type is what comes before the first ':', or the whole id when there is none.
_ITEM_TYPE = ("CASE WHEN instr(item, ':') > 0 THEN substr(item, 1, instr(item, ':') - 1) "
              "ELSE item END")
# day_of(): the UTC day of int(ts / 86400), the same float division as Python's.
_BUCKETS = {
    "day": "date(CAST(ts / 86400 AS INTEGER) * 86400, 'unixepoch')",
    "region": "region",
}


def _add_rollup(dimension: str) -> str:
    bucket = _BUCKETS[dimension]
    return (f"INSERT INTO rollups (counter, item_type, dimension, bucket, value) "
            f"SELECT counter, {_ITEM_TYPE} AS t, '{dimension}', {bucket} AS b, sum(delta) AS d "
            f"FROM changelog WHERE seq > ? AND seq <= ? GROUP BY counter, t, b HAVING d != 0 "
            f"ON CONFLICT DO UPDATE SET value = value + excluded.value")


_ROLLUP_SQL = {dimension: _add_rollup(dimension) for dimension in _BUCKETS}


def log_range(conn: sqlite3.Connection, after: int, limit: int) -> tuple[int, int, float | None]:
    """(events, newest seq, oldest ts) of the next ``limit`` events after ``after``."""
    events, upto, oldest = conn.execute(_RANGE, (after, limit)).fetchone()
    return int(events), int(upto or after), oldest


def range_sums(conn: sqlite3.Connection, after: int, upto: int) -> dict[CountKey, int]:
    """The summed deltas per key of the events in (after, upto]."""
    return {(c, i): d for c, i, d in conn.execute(_SUMS, (after, upto))}


def apply_range(conn: sqlite3.Connection, after: int, upto: int,
                rollups: Collection[str]) -> dict[CountKey, int]:
    """Adds the events in (after, upto] to the counts and to the rollups named (as ``coalesce``
    does, dimensions it does not know are ignored); returns the new absolute counts of the keys
    written. The caller moves the watermark and trims in the same transaction."""
    new = {(c, i): n for c, i, n in conn.execute(_ADD_COUNTS, (after, upto))}
    for dimension in _BUCKETS:
        if dimension in rollups:
            conn.execute(_ROLLUP_SQL[dimension], (after, upto))
    return new
