"""Older databases open at the current schema with every row kept; mismatched files are refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tally.store.sqlite.schema import SCHEMA_VERSION, counts_path
from tally.store.sqlite.store import SqliteStore
from tests.helpers import db_rows, like, recount, stored

pytestmark = pytest.mark.anyio

SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
CREATE TABLE toggles (
    counter TEXT NOT NULL, user TEXT NOT NULL, item TEXT NOT NULL,
    state INTEGER NOT NULL, version INTEGER NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (counter, user, item)
) WITHOUT ROWID;
CREATE INDEX toggles_on_by_item ON toggles (counter, item) WHERE state = 1;
CREATE TABLE changelog (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    counter TEXT NOT NULL, item TEXT NOT NULL, user TEXT,
    delta INTEGER NOT NULL, ts REAL NOT NULL, region TEXT NOT NULL
);
CREATE TABLE counts (
    item TEXT NOT NULL, counter TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (item, counter)
) WITHOUT ROWID;
CREATE INDEX counts_by_counter ON counts (counter, item);
CREATE TABLE watermarks (consumer TEXT NOT NULL, source TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (consumer, source)) WITHOUT ROWID;
INSERT INTO toggles VALUES ('like', '1', 'post:1', 1, 1, 0), ('like', '2', 'post:1', 0, 2, 0),
                           ('like', '3', 'post:1', 1, 1, 0), ('like', '1', 'post:2', 1, 1, 0);
INSERT INTO changelog (counter, item, user, delta, ts, region)
    VALUES ('like', 'post:2', '1', 1, 0, 'local');
INSERT INTO counts VALUES ('post:1', 'like', 2), ('post:2', 'view', 9);
INSERT INTO watermarks VALUES ('aggregator', 'local', 0);
"""


async def test_schema_1_is_migrated_in_place(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.executescript(SCHEMA_1)
    conn.close()

    s = SqliteStore(db)
    await s.start()
    try:
        assert db_rows(db, "SELECT value FROM meta WHERE key='schema_version'") == [
            (str(SCHEMA_VERSION),)]
        indexes = db_rows(db, "SELECT name FROM sqlite_master WHERE type='index' "
                              "AND name NOT LIKE 'sqlite_autoindex%'")
        assert ("toggles_on_by_item",) not in indexes and ("counts_by_counter",) not in indexes
        assert recount(db) == {("like", "post:1"): 2, ("like", "post:2"): 1}
        assert stored(db) == {("like", "post:1"): 2, ("view", "post:2"): 9}
        # The unapplied log row still counts in write answers; versions carry on.
        (res,) = await s.write([like(4, "post:2")])
        assert (res.changed, res.count) == (True, 2)
        (res,) = await s.write([like(2, "post:1")])
        assert (res.changed, res.count) == (True, 3)
        assert db_rows(db, "SELECT version FROM toggles WHERE user='2'") == [(3,)]
        assert await s.has("like", "1", ["post:1", "post:2", "post:3"]) == [True, True, False]
    finally:
        await s.close()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    conn = sqlite3.connect(db)
    conn.executescript("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                       f"INSERT INTO meta VALUES ('schema_version', '{SCHEMA_VERSION + 1}');")
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        await SqliteStore(db).start()


# Schema 2: one file, the counts beside the like records.
SCHEMA_2 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '2');
CREATE TABLE toggles (counter TEXT NOT NULL, item TEXT NOT NULL, user TEXT NOT NULL,
    state INTEGER NOT NULL, version INTEGER NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (counter, item, user)) WITHOUT ROWID;
CREATE TABLE changelog (seq INTEGER PRIMARY KEY AUTOINCREMENT, counter TEXT NOT NULL,
    item TEXT NOT NULL, user TEXT, delta INTEGER NOT NULL, ts REAL NOT NULL, region TEXT NOT NULL);
CREATE TABLE counts (counter TEXT NOT NULL, item TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (counter, item)) WITHOUT ROWID;
CREATE TABLE watermarks (consumer TEXT NOT NULL, source TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (consumer, source)) WITHOUT ROWID;
CREATE TABLE rollups (counter TEXT NOT NULL, item_type TEXT NOT NULL, dimension TEXT NOT NULL,
    bucket TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (counter, item_type, dimension, bucket)) WITHOUT ROWID;
INSERT INTO toggles VALUES ('like', 'post:1', '1', 1, 1, 0), ('like', 'post:1', '2', 1, 1, 0),
                           ('like', 'post:2', '1', 1, 1, 0);
INSERT INTO changelog (seq, counter, item, user, delta, ts, region)
    VALUES (3, 'like', 'post:2', '1', 1, 0, 'local');
INSERT INTO counts VALUES ('like', 'post:1', 2), ('view', 'post:2', 9);
INSERT INTO watermarks VALUES ('aggregator', 'local', 2);
INSERT INTO rollups VALUES ('like', 'post', 'region', 'local', 2);
"""


@pytest.mark.parametrize("interrupted", [False, True])
async def test_schema_2_moves_its_counts_to_their_own_file(tmp_path: Path,
                                                           interrupted: bool) -> None:
    """The count tables move to the counts file; a move cut short between its two steps (the
    copy committed, the main file still at schema 2) is done again over the partial copy."""
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.executescript(SCHEMA_2)
    conn.close()
    if interrupted:
        partial = sqlite3.connect(counts_path(db))
        partial.executescript("CREATE TABLE counts (counter TEXT, item TEXT, count INTEGER, "
                              "PRIMARY KEY (counter, item)) WITHOUT ROWID;"
                              "INSERT INTO counts VALUES ('like', 'post:1', 99);")
        partial.close()

    s = SqliteStore(db)
    await s.start()
    try:
        assert db_rows(db, "SELECT value FROM main.meta WHERE key='schema_version'") == [("3",)]
        tables = {r[0] for r in db_rows(db, "SELECT name FROM main.sqlite_master")}
        assert not tables & {"counts", "watermarks", "rollups"}
        assert stored(db) == {("like", "post:1"): 2, ("view", "post:2"): 9}
        assert await s.watermarks("aggregator") == {"local": 2}
        assert await s.rollups("like", "post", "region") == {"local": 2}
        (res,) = await s.write([like(2, "post:2")])  # the unapplied log row still counts
        assert (res.changed, res.count) == (True, 2)
    finally:
        await s.close()


async def test_counts_of_another_database_or_none_are_refused(tmp_path: Path) -> None:
    """Without its own counts file, a database with a history would count from zero for good."""
    db, other = tmp_path / "a.db", tmp_path / "b.db"
    for path in (db, other):
        s = SqliteStore(path)
        await s.start()
        await s.write([like(1, "post:1")])
        await s.close()
    counts_path(db).rename(tmp_path / "a-counts.bak")
    with pytest.raises(RuntimeError, match="counts file"):
        await SqliteStore(db).start()
    counts_path(other).rename(counts_path(db))
    with pytest.raises(RuntimeError, match="counts file"):
        await SqliteStore(db).start()
