"""Pipelined syncs: a commit is answered only after a WAL sync that began after it, a failed sync
stops the writer, and derived counts never commit ahead of the like records they came from."""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from tally.core.errors import Unavailable
from tally.core.model import ToggleOp
from tally.store.sqlite.schema import connect
from tally.store.sqlite.store import SqliteStore
from tally.store.sqlite.writer import (
    GroupCommitWriter,
    Tx,
    WalSync,
    pipelines_sync,
)
from tally.store.sqlite.writer_process import WriterConfig, _Child

pytestmark = pytest.mark.anyio


class GatedSync:
    """A ``durable`` callable that syncs the real WAL, but only once the test lets it."""

    def __init__(self, path: Path) -> None:
        self.wal = WalSync(path)
        self.gate = threading.Event()
        self.started = threading.Event()
        self.calls = 0
        self.fail: OSError | None = None

    def __call__(self) -> None:
        self.started.set()
        self.gate.wait(10)
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        self.wal()


def open_db(path: Path) -> sqlite3.Connection:
    conn = connect(path, "FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY)")
    return conn


@pytest.fixture
async def gated(tmp_path: Path) -> AsyncIterator[tuple[GroupCommitWriter, GatedSync, Path]]:
    db = tmp_path / "w.db"
    sync = GatedSync(db)
    writer = GroupCommitWriter(lambda: open_db(db), durable=sync)
    writer.start()
    yield writer, sync, db
    sync.gate.set()
    await writer.stop()
    sync.wal.close()


def insert(k: int):  # type: ignore[no-untyped-def]
    def job(conn: sqlite3.Connection, tx: Tx) -> int:
        conn.execute("INSERT INTO t VALUES (?)", (k,))
        return k
    return job


def visible(db: Path) -> list[int]:
    conn = sqlite3.connect(str(db))
    try:
        return [k for (k,) in conn.execute("SELECT k FROM t ORDER BY k")]
    finally:
        conn.close()


async def test_a_commit_is_answered_only_after_its_sync(
        gated: tuple[GroupCommitWriter, GatedSync, Path]) -> None:
    writer, sync, db = gated
    fut = writer.submit(insert(1))
    await anyio.to_thread.run_sync(sync.started.wait, 10)
    await anyio.sleep(0.05)
    # Committed (another connection sees it), but not yet synced: not answered.
    assert visible(db) == [1]
    assert not fut.done()
    sync.gate.set()
    assert await fut == 1
    assert sync.calls >= 1 and writer.syncs >= 1


async def test_commits_made_during_a_sync_share_the_next(
        gated: tuple[GroupCommitWriter, GatedSync, Path]) -> None:
    writer, sync, db = gated
    first = writer.submit(insert(1))
    await anyio.to_thread.run_sync(sync.started.wait, 10)
    # The writer goes on committing while the first sync waits: a commit each.
    later = []
    for k in range(2, 6):
        later.append(writer.submit(insert(k)))
        with anyio.fail_after(10):
            while k not in visible(db):
                await anyio.sleep(0.01)
    assert writer.commits == 5
    assert not any(f.done() for f in [first, *later])
    sync.gate.set()
    assert [await f for f in [first, *later]] == list(range(1, 6))
    assert sync.calls == 2  # the first commit's sync, then one for the four behind it


async def test_a_failed_sync_fails_its_commits_and_stops_writes(
        gated: tuple[GroupCommitWriter, GatedSync, Path]) -> None:
    writer, sync, _db = gated
    sync.fail = OSError(5, "Input/output error")
    fut = writer.submit(insert(1))
    sync.gate.set()
    with pytest.raises(Unavailable, match="sync failed"):
        await fut
    with pytest.raises(Unavailable, match="failed sync"):
        writer.submit(insert(2))


async def test_stop_answers_every_commit_made(tmp_path: Path) -> None:
    db = tmp_path / "w.db"
    sync = WalSync(db)
    writer = GroupCommitWriter(lambda: open_db(db), durable=sync)
    writer.start()
    futures = [writer.submit(insert(k)) for k in range(50)]
    await writer.stop()
    assert [f.result() for f in futures] == list(range(50))
    assert sync.syncs >= 1
    sync.close()


def test_wal_sync_follows_the_file(tmp_path: Path) -> None:
    db = tmp_path / "w.db"
    sync = WalSync(db)
    sync()  # no WAL yet: nothing to sync, no error
    assert sync.syncs == 0
    conn = open_db(db)
    conn.execute("INSERT INTO t VALUES (1)")
    sync()
    first = os.stat(sync.path).st_ino
    conn.close()  # the last connection: SQLite checkpoints and removes the WAL
    assert not os.path.exists(sync.path)
    sync()  # gone: nothing waits
    conn = open_db(db)
    conn.execute("INSERT INTO t VALUES (2)")
    sync()  # a new WAL file: synced through a new descriptor
    assert sync.syncs == 2
    assert os.fstat(sync._fd).st_ino == os.stat(sync.path).st_ino  # type: ignore[arg-type]
    del first
    conn.close()
    sync.close()


def test_only_full_durability_pipelines() -> None:
    assert pipelines_sync("FULL") and pipelines_sync("full")
    assert not pipelines_sync("NORMAL") and not pipelines_sync("EXTRA")


async def test_counts_commit_after_the_like_records_are_synced(tmp_path: Path) -> None:
    """The counts writer syncs the likes WAL before each commit of its own, so no count can be
    durable ahead of the like that made it."""
    store = SqliteStore(tmp_path / "tally.db")
    await store.start()
    try:
        assert store.pipelined_sync and len(store.likes_syncs) == 1
        ops = [ToggleOp("like", f"post:{i}", "u1", True, "local") for i in range(20)]
        results = await store.write(ops)
        assert all(r.changed for r in results)
        before = store.likes_syncs[0].syncs
        applied = await store.aggregate("aggregator", 1000, [])
        assert applied.events == 20
        assert store.likes_syncs[0].syncs > before
        assert (await store.get([("like", "post:3")]))[("like", "post:3")] == 1
    finally:
        await store.close()


class FsyncgateSync(WalSync):
    """The likes WAL's sync as Linux answers after a failed writeback: EIO once, then success,
    though the pages it could not write are gone (tests/faults shows it on a real filesystem)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.failures = 1

    def __call__(self) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EIO, "Input/output error")
        super().__call__()


async def test_a_failed_likes_sync_stops_the_counts_though_the_next_would_succeed(
        tmp_path: Path) -> None:
    """Regression (found by tests/faults/test_fsync_eio.py): the counts writer retried its round
    after an EIO, the retry's sync succeeded, and counts of events that a power cut then erased
    became durable: counts above a recount, for good."""
    store = SqliteStore(tmp_path / "tally.db")
    await store.start()
    try:
        store.likes_syncs[0] = FsyncgateSync(tmp_path / "tally.db")
        await store.write([ToggleOp("like", "post:1", f"u{i}", True, "local") for i in range(5)])
        for _ in range(2):  # the first round meets the EIO, the second a sync that "succeeds"
            with pytest.raises(Unavailable):
                await store.aggregate("aggregator", 1000, [])
        assert await store.get([("like", "post:1")]) == {}
        assert store.likes_syncs[0].syncs == 0  # stopped before syncing: nothing to trust
    finally:
        await store.close()


async def test_a_likes_writers_failed_sync_stops_the_counts(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "tally.db")
    await store.start()
    try:
        await store.write([ToggleOp("like", "post:1", "u1", True, "local")])
        store.writer_processes[0].sync_failed = True  # as its child reports it
        with pytest.raises(Unavailable):
            await store.aggregate("aggregator", 1000, [])
        assert await store.get([("like", "post:1")]) == {}
    finally:
        await store.close()


async def test_normal_durability_keeps_sqlite_syncs_off_the_writer(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "tally.db", synchronous="NORMAL")
    assert not store.pipelined_sync and store.likes_syncs == []


@pytest.mark.parametrize(("synchronous", "levels"), [("FULL", (1, 2)), ("EXTRA", (3, 3))])
async def test_the_writer_commits_unsynced_only_when_it_syncs_itself(
        tmp_path: Path, synchronous: str, levels: tuple[int, int]) -> None:
    """FULL: NORMAL (1) on the likes writer's own file, whose sync thread syncs it, and FULL (2)
    on the counts file it attaches. EXTRA: SQLite's own syncs (3) on both."""
    child = _Child(WriterConfig(tmp_path / "tally.db", synchronous))
    child.writer.start()
    try:
        got = await child.writer.run(lambda c, tx: (
            c.execute("PRAGMA main.synchronous").fetchone()[0],
            c.execute("PRAGMA counts.synchronous").fetchone()[0]))
        assert got == levels
        assert (child.wal_sync is not None) == (synchronous == "FULL")
    finally:
        await child.writer.stop()
        if child.wal_sync is not None:
            child.wal_sync.close()
