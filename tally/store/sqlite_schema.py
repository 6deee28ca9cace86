"""The embedded SQLite schema, and how connections to it are opened."""

from __future__ import annotations

import sqlite3
from pathlib import Path

SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

-- The source of truth: one row per (counter, user, item) that was ever set. Keyed by item
-- first, with no second index: a recount of an item is a range scan, has-liked is one seek per
-- item, and a like writes one B-tree page instead of two (schema 1 had a by-item index beside a
-- by-user key: half the writer's time under bulk likes).
CREATE TABLE IF NOT EXISTS toggles (
    counter TEXT NOT NULL, item TEXT NOT NULL, user TEXT NOT NULL,
    state INTEGER NOT NULL, version INTEGER NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (counter, item, user)
) WITHOUT ROWID;

-- Every real change, appended in the same transaction (AUTOINCREMENT: a trimmed log never
-- reuses a sequence number, so a watermark cannot skip a new event).
CREATE TABLE IF NOT EXISTS changelog (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    counter TEXT NOT NULL, item TEXT NOT NULL, user TEXT,
    delta INTEGER NOT NULL, ts REAL NOT NULL, region TEXT NOT NULL
);

-- Derived counts and the watermark they are consistent with.
CREATE TABLE IF NOT EXISTS counts (
    counter TEXT NOT NULL, item TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (counter, item)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS watermarks (
    consumer TEXT NOT NULL, source TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (consumer, source)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rollups (
    counter TEXT NOT NULL, item_type TEXT NOT NULL, dimension TEXT NOT NULL,
    bucket TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (counter, item_type, dimension, bucket)
) WITHOUT ROWID;

-- Idempotency keys of event counters, kept for each counter's window.
CREATE TABLE IF NOT EXISTS idempotency (
    counter TEXT NOT NULL, key TEXT NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (counter, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_expiry ON idempotency (expires_at);
"""


def connect(path: Path, synchronous: str, readonly: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, with busy waiting."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                           timeout=30.0, cached_statements=256)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA temp_store=MEMORY")
    conn.execute("PRAGMA cache_size=-65536")  # 64 MiB page cache per connection
    if readonly:
        conn.execute("PRAGMA query_only=1")
    return conn


# Schema 1 -> 2: the same rows, keyed by (counter, item, ...) and without the second indexes.
_V1_TO_V2 = [
    "CREATE TABLE toggles_v2 (counter TEXT NOT NULL, item TEXT NOT NULL, user TEXT NOT NULL, "
    "state INTEGER NOT NULL, version INTEGER NOT NULL, updated_at REAL NOT NULL, "
    "PRIMARY KEY (counter, item, user)) WITHOUT ROWID",
    "INSERT INTO toggles_v2 SELECT counter, item, user, state, version, updated_at FROM toggles",
    "DROP TABLE toggles",
    "ALTER TABLE toggles_v2 RENAME TO toggles",
    "CREATE TABLE counts_v2 (counter TEXT NOT NULL, item TEXT NOT NULL, count INTEGER NOT NULL, "
    "PRIMARY KEY (counter, item)) WITHOUT ROWID",
    "INSERT INTO counts_v2 SELECT counter, item, count FROM counts",
    "DROP TABLE counts",
    "ALTER TABLE counts_v2 RENAME TO counts",
]


def migrate(conn: sqlite3.Connection) -> None:
    """Creates the schema, or brings an older database to this version in one transaction."""
    conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    version = int(row[0]) if row else None
    if version is not None and version > SCHEMA_VERSION:
        raise RuntimeError(f"database schema {version} is newer than this Tally ({SCHEMA_VERSION})")
    if version == 1:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _V1_TO_V2:
                conn.execute(statement)
            conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    conn.executescript(SCHEMA)
    if version is None:
        conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
