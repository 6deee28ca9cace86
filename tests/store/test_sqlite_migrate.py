"""A schema-1 database (by-user key plus a by-item index) opens as schema 2 with every row kept."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tally.store.sqlite import SqliteStore
from tally.store.sqlite_schema import SCHEMA_VERSION
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
