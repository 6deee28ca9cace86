"""Aggregation inside the embedded database: the counts writer's connection sees the change log
(the likes file, attached) and the counts (its own file), so a round is a few set-wise statements
in one transaction instead of a Python object per event read, summed and written back.

It is the same aggregator (``tally.core.coalesce`` defines the semantics; a test holds the two to
the same counts and rollups): read after the watermark, sum per (counter, item) and per rollup
bucket, drop zero sums, add and move the watermark in one transaction of the counts file; the
likes writer trims the applied events afterwards. Under bulk likes the per-event Python of the
generic path (build an Event, sum it, bind it again) held the GIL for as long as the writer's own
work, and the GIL is what one process's writes are bounded by.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection

import orjson

from tally.core.model import CountKey

# Events of one round, as a range of the log: (after, upto]. The subquery stops at ``limit`` rows.
_RANGE = ("SELECT count(*), max(seq), min(ts) FROM "
          "(SELECT seq, ts FROM {log} WHERE seq > ? ORDER BY seq LIMIT ?)")

# A round's sums go to a temporary table once; the counts are added from it, and its deltas and
# the new counts come back as one JSON row: a row per key would hand the GIL over and back for
# each, and the likes writer waits in that queue.
_ROUND_TABLE = ("CREATE TEMP TABLE IF NOT EXISTS round_sums (counter TEXT NOT NULL, "
                "item TEXT NOT NULL, d INTEGER NOT NULL, PRIMARY KEY (counter, item)) WITHOUT ROWID")
_SUMS = ("INSERT INTO temp.round_sums SELECT counter, item, sum(delta) AS d FROM {log} "
         "WHERE seq > ? AND seq <= ? GROUP BY counter, item HAVING d != 0")
_ADD_COUNTS = ("INSERT INTO counts (counter, item, count) SELECT counter, item, d "
               "FROM temp.round_sums WHERE true "
               "ON CONFLICT (counter, item) DO UPDATE SET count = count + excluded.count")
_RESULT = ("SELECT json_group_array(json_array(r.counter, r.item, c.count)) "
           "FROM temp.round_sums r JOIN counts c ON c.counter = r.counter AND c.item = r.item")

# split_item(): the type is what comes before the first ':', or the whole id when there is none.
_ITEM_TYPE = ("CASE WHEN instr(item, ':') > 0 THEN substr(item, 1, instr(item, ':') - 1) "
              "ELSE item END")
# The rollups' sums, in one pass over the round's events: per counter, item type, day number
# (int(ts / 86400), the same float division as Python's day_of()) and region. Each dimension is
# then summed from these few rows, so the item type is worked out once per event and the date
# string once per day: a pass per dimension, each working both out per event, cost the round
# several times what the counts themselves cost.
_ROLLUP_TABLE = ("CREATE TEMP TABLE IF NOT EXISTS round_rollups (counter TEXT NOT NULL, "
                 "t TEXT NOT NULL, dn INTEGER NOT NULL, region TEXT NOT NULL, d INTEGER NOT NULL)")
_ROLLUP_SUMS = (f"INSERT INTO temp.round_rollups SELECT counter, {_ITEM_TYPE} AS t, "
                f"CAST(ts / 86400 AS INTEGER) AS dn, region, sum(delta) FROM {{log}} "
                f"WHERE seq > ? AND seq <= ? GROUP BY counter, t, dn, region")
_BUCKETS = {
    "day": ("date(dn * 86400, 'unixepoch')", "dn"),
    "region": ("region", "region"),
}


def _add_rollup(dimension: str) -> str:
    bucket, group = _BUCKETS[dimension]
    return (f"INSERT INTO rollups (counter, item_type, dimension, bucket, value) "
            f"SELECT counter, t, '{dimension}', {bucket}, sum(d) AS v FROM temp.round_rollups "
            f"WHERE true GROUP BY counter, t, {group} HAVING v != 0 "
            f"ON CONFLICT DO UPDATE SET value = value + excluded.value")


_ROLLUP_SQL = {dimension: _add_rollup(dimension) for dimension in _BUCKETS}


def _in(sql: str, schema: str) -> str:
    return sql.replace("{log}", f"{schema}.changelog")


def log_range(conn: sqlite3.Connection, after: int, limit: int, schema: str = "likes"
              ) -> tuple[int, int, float | None]:
    """(events, newest seq, oldest ts) of the next ``limit`` events after ``after`` in the log
    of the like records attached as ``schema``."""
    events, upto, oldest = conn.execute(_in(_RANGE, schema), (after, limit)).fetchone()
    return int(events), int(upto or after), oldest


def apply_range(conn: sqlite3.Connection, after: int, upto: int, rollups: Collection[str],
                schema: str = "likes") -> dict[CountKey, int]:
    """Adds the events in (after, upto] to the counts and to the rollups named (as ``coalesce``
    does, dimensions it does not know are ignored). Returns the new absolute counts of the keys
    written. The caller moves the watermark in the same transaction."""
    conn.execute(_ROUND_TABLE)
    conn.execute("DELETE FROM temp.round_sums")
    conn.execute(_in(_SUMS, schema), (after, upto))
    conn.execute(_ADD_COUNTS)
    wanted = [dimension for dimension in _BUCKETS if dimension in rollups]
    if wanted:
        conn.execute(_ROLLUP_TABLE)
        conn.execute("DELETE FROM temp.round_rollups")
        conn.execute(_in(_ROLLUP_SUMS, schema), (after, upto))
        for dimension in wanted:
            conn.execute(_ROLLUP_SQL[dimension])
    rows = orjson.loads(conn.execute(_RESULT).fetchone()[0])
    return {(counter, item): count for counter, item, count in rows}
