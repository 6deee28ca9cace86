"""The embedded SQLite schema, and how connections to it are opened."""

from __future__ import annotations

import sqlite3
from pathlib import Path

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

-- The source of truth: one row per (counter, user, item) that was ever set.
CREATE TABLE IF NOT EXISTS toggles (
    counter TEXT NOT NULL, user TEXT NOT NULL, item TEXT NOT NULL,
    state INTEGER NOT NULL, version INTEGER NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (counter, user, item)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS toggles_on_by_item ON toggles (counter, item) WHERE state = 1;

-- Every real change, appended in the same transaction (AUTOINCREMENT: a trimmed log never
-- reuses a sequence number, so a watermark cannot skip a new event).
CREATE TABLE IF NOT EXISTS changelog (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    counter TEXT NOT NULL, item TEXT NOT NULL, user TEXT,
    delta INTEGER NOT NULL, ts REAL NOT NULL, region TEXT NOT NULL
);

-- Derived counts and the watermark they are consistent with.
CREATE TABLE IF NOT EXISTS counts (
    item TEXT NOT NULL, counter TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (item, counter)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS counts_by_counter ON counts (counter, item);
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


def migrate(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA)
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    if row is None:
        conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    elif int(row[0]) > SCHEMA_VERSION:
        raise RuntimeError(f"database schema {row[0]} is newer than this Tally ({SCHEMA_VERSION})")
