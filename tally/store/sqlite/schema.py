"""The embedded SQLite schema, and how connections to it are opened."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

SCHEMA_VERSION = 3

# Two files, each with its own writer: the like records and their change log (``tally.db``), and
# the counts derived from them (``tally-counts.db``). With one writer, each aggregation round
# would run between like commits, and every write queued behind it would wait for it. Each
# connection opens one file and attaches the other, so every statement names tables unqualified;
# a connection only ever writes the file it opened.
LIKES_SCHEMA = """
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

-- Idempotency keys of event counters, kept for each counter's window.
CREATE TABLE IF NOT EXISTS idempotency (
    counter TEXT NOT NULL, key TEXT NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (counter, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_expiry ON idempotency (expires_at);
"""

# Derived counts and the watermark they are consistent with, in the schema named ``counts``.
COUNTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS counts.counts (
    counter TEXT NOT NULL, item TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (counter, item)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counts.watermarks (
    consumer TEXT NOT NULL, source TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (consumer, source)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counts.rollups (
    counter TEXT NOT NULL, item_type TEXT NOT NULL, dimension TEXT NOT NULL,
    bucket TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (counter, item_type, dimension, bucket)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counts.counts_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
COUNT_TABLES = ("counts", "watermarks", "rollups")


def counts_path(path: Path) -> Path:
    """The counts file beside the like records: ``tally.db`` -> ``tally-counts.db``."""
    return path.with_name(f"{path.stem}-counts{path.suffix}")


def likes_path(path: Path, shard: int) -> Path:
    """The file of one shard of the like records: shard 0 is ``tally.db`` itself (the only one
    before shards), shard k ``tally-likes{k}.db``."""
    return path if shard == 0 else path.with_name(f"{path.stem}-likes{shard}{path.suffix}")


def likes_schema(shard: int) -> str:
    """The schema a shard's file is attached as, on connections that open the counts file."""
    return "likes" if shard == 0 else f"likes{shard}"


# Bytes of each file read through a memory map (address space, not memory: the pages are the
# operating system's file cache, shared by every connection). The most SQLite's usual builds map
# (SQLITE_MAX_MMAP_SIZE; a larger request is cut to it): a page past the map costs a read system
# call into the connection's own cache, and a large store's random seeks (has-liked at 100M
# likes) land there.
MMAP_BYTES = 0x7FFF0000


def connect(path: Path, synchronous: str, readonly: bool = False,
            writes: str = "likes", shard: int = 0, shards: int = 1) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, with busy waiting, to
    the file it ``writes``: ``likes`` (shard ``shard`` of the like records, with the counts file
    attached as ``counts``) or ``counts`` (with each of the ``shards`` like files attached as
    ``likes_schema(k)``). Readers open it as ``counts`` too, so they see every shard.

    Each file is read through a memory map, so every connection reads the operating system's
    cached pages in place. Without it each connection copies pages into its own cache with a read
    call apiece, and once the like records outgrow that cache a feed's many has-liked lookups pay
    for it on every request (measured in docs/performance.md)."""
    counts = counts_path(Path(path))
    if writes == "likes":
        main, others = likes_path(Path(path), shard), {"counts": counts}
    else:
        main, others = counts, {likes_schema(k): likes_path(Path(path), k) for k in range(shards)}
    conn = sqlite3.connect(str(main), isolation_level=None, check_same_thread=False,
                           timeout=30.0, cached_statements=256)
    for name, file in others.items():
        conn.execute("ATTACH DATABASE ? AS " + name, (str(file),))
    for schema in ("main", *others):
        conn.execute(f"PRAGMA {schema}.journal_mode=WAL")
        conn.execute(f"PRAGMA {schema}.synchronous={synchronous}")
        conn.execute(f"PRAGMA {schema}.cache_size=-65536")  # 64 MiB page cache per file
        conn.execute(f"PRAGMA {schema}.mmap_size={MMAP_BYTES}")
    conn.execute("PRAGMA temp_store=MEMORY")
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


def _v2_to_v3(conn: sqlite3.Connection) -> None:
    """Copies the count tables into the counts file, then drops them from the main one. Each
    step is one transaction on one file; a crash between them leaves the main file at schema 2,
    and the next start copies again over the partial copy."""
    conn.executescript(COUNTS_SCHEMA)
    present = [t for t in COUNT_TABLES if conn.execute(
        "SELECT 1 FROM main.sqlite_master WHERE type='table' AND name=?", (t,)).fetchone()]
    conn.execute("BEGIN")
    try:
        for table in present:
            conn.execute(f"DELETE FROM counts.{table}")
            conn.execute(f"INSERT INTO counts.{table} SELECT * FROM main.{table}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("BEGIN")
    try:
        for table in present:
            conn.execute(f"DROP TABLE main.{table}")
        conn.execute("UPDATE meta SET value='3' WHERE key='schema_version'")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def migrate(conn: sqlite3.Connection, shard: int = 0) -> None:
    """Creates the schema, or brings an older database to this version. ``conn`` is a likes
    connection (``connect(writes="likes")``) of shard ``shard``; shard 0 is set up first."""
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
            conn.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        version = 2
    if version == 2:
        _v2_to_v3(conn)
    conn.executescript(LIKES_SCHEMA)
    conn.executescript(COUNTS_SCHEMA)
    if version is None:
        conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    _pair(conn, created=version is None or version < SCHEMA_VERSION, adopt=shard > 0)


def _pair(conn: sqlite3.Connection, created: bool, adopt: bool = False) -> None:
    """Both files carry one database id. Counts of another database, or none beside like records
    that have a history, would be wrong for good (the applied log is trimmed, and event counters
    live only in the counts), so that refuses to start instead of counting from zero."""
    row = conn.execute("SELECT value FROM meta WHERE key='db_id'").fetchone()
    if row is None and created and adopt:  # a new shard joins the database shard 0 paired
        row = conn.execute("SELECT value FROM counts_meta WHERE key='db_id'").fetchone()
        if row is not None:
            conn.execute("INSERT INTO meta VALUES ('db_id', ?)", (row[0],))
    db_id = row[0] if row else uuid.uuid4().hex
    if row is None:
        conn.execute("INSERT INTO meta VALUES ('db_id', ?)", (db_id,))
    paired = conn.execute("SELECT value FROM counts_meta WHERE key='db_id'").fetchone()
    if paired is None and (created or row is None):
        conn.execute("INSERT INTO counts_meta VALUES ('db_id', ?)", (db_id,))
    elif paired is None or paired[0] != db_id:
        file = conn.execute("PRAGMA database_list").fetchall()
        raise RuntimeError(f"the counts file beside the like records is missing or belongs to "
                           f"another database ({file}): restore it from the same backup as the "
                           f"like records")
