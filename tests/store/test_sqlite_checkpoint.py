"""The background checkpointer: commits append to the WAL, another thread copies it over."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from tally.core.errors import Unavailable
from tally.store.sqlite.checkpoint import BACKSTOP_PAGES, Checkpointer
from tally.store.sqlite.schema import counts_path
from tally.store.sqlite.store import SqliteStore
from tally.store.sqlite.writer_process import WriterConfig, _Child
from tally.workers.aggregator import Aggregator
from tests.helpers import like, poll, recount, stored

pytestmark = pytest.mark.anyio


def _wal_left(path: Path) -> tuple[int, int]:
    """(frames in the WAL, frames of it already copied into the database), read by a fresh
    connection that copies nothing itself."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_autocheckpoint=0")
        return conn.execute("PRAGMA wal_checkpoint(NOOP)").fetchone()[1:]  # type: ignore[no-any-return]
    except sqlite3.OperationalError:  # NOOP needs SQLite 3.37+: fall back to PASSIVE's answer
        return conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1:]  # type: ignore[no-any-return]
    finally:
        conn.close()


async def test_the_thread_copies_both_files_and_the_writers_only_back_it_up(db: Path) -> None:
    s = SqliteStore(db)
    await s.start()
    try:
        backstop = await s.counts_writer.run(lambda c, tx: c.execute("PRAGMA wal_autocheckpoint")
                                             .fetchone()[0])
        likes = _Child(WriterConfig(db))._open()  # as the likes writer opens its connection
        try:
            likes_backstop = likes.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        finally:
            likes.close()
        assert backstop == likes_backstop == BACKSTOP_PAGES
        for n in range(20):
            await s.write([like(u, f"post:{n}") for u in range(50)])
        await Aggregator(s, s, window_s=0.001).drain()
        ckpt, start = s.checkpointer, s.checkpointer.checkpoints

        async def two_more() -> bool:
            return ckpt.checkpoints >= start + 2

        await poll(two_more)
        for path in (db, counts_path(db)):
            frames, copied = _wal_left(path)
            assert frames > 0 and copied == frames, path  # everything committed is in the file
        assert ckpt.failures == 0
        assert stored(db) == recount(db)
    finally:
        await s.close()


def test_a_failing_checkpoint_is_counted_and_the_thread_goes_on(tmp_path: Path) -> None:
    conns: list[sqlite3.Connection] = []

    def open_conn() -> sqlite3.Connection:
        conns.append(sqlite3.connect(tmp_path / "x.db", check_same_thread=False))
        return conns[-1]

    c = Checkpointer(open_conn, {"x": "main", "nope": "nope"}, interval_s=0.001)
    c.start()
    try:
        deadline = time.monotonic() + 10
        while c.failures < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.failures >= 2 and c.checkpoints == 0  # "nope" is no schema: each round fails
    finally:
        c.stop()
    with pytest.raises(RuntimeError):
        c.run_once()


class _FailingConn:
    """A connection whose checkpoint meets an I/O error, as a failed fsync of the WAL gives."""

    def __init__(self) -> None:
        self.calls = 0

    def execute(self, sql: str) -> sqlite3.Cursor:
        self.calls += 1
        exc = sqlite3.OperationalError("disk I/O error")
        exc.sqlite_errorcode = 4874  # SQLITE_IOERR_FSYNC
        raise exc

    def close(self) -> None:
        pass


def test_an_io_error_stops_checkpoints_for_good(tmp_path: Path) -> None:
    """Regression (found by tests/faults/test_fsync_eio.py): after a failed fsync the next one
    "succeeds", and a checkpoint then copied WAL frames that never reached the disk into the
    database file, where a power cut left them under the WAL's older frames: counts off a
    recount. An I/O error now stops the checkpoints until a restart."""
    failing = _FailingConn()
    c = Checkpointer(lambda: failing, {"x": "main"})  # type: ignore[arg-type,return-value]
    c._conn = failing  # type: ignore[assignment]
    c.tick()
    c.tick()
    assert failing.calls == 1 and c.io_error is not None and c.failures == 1


def test_no_checkpoint_once_a_sync_failed_elsewhere(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "x.db", check_same_thread=False)
    halted = [False]
    c = Checkpointer(lambda: conn, {"x": "main"}, halted=lambda: halted[0])
    c._conn = conn
    c.tick()
    halted[0] = True
    c.tick()
    assert c.checkpoints == 1
    conn.close()


async def test_a_failed_checkpoint_io_stops_the_counts(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "tally.db")
    await store.start()
    try:
        await store.write([like("u1", "post:1")])
        store.checkpointer.io_error = sqlite3.OperationalError("disk I/O error")
        with pytest.raises(Unavailable):
            await store.aggregate("aggregator", 1000, [])
    finally:
        await store.close()


async def test_start_settles_every_wal_before_the_counts_derive_from_it(db: Path) -> None:
    """A WAL left with frames (here by another connection that stays open, as a crashed server
    leaves one) is copied into its database file and emptied before the counts writer starts:
    see ``settle_wal`` (tests/faults/test_settle_wal.py shows it against a power cut)."""
    s = SqliteStore(db)
    await s.start()
    await s.write([like(u, "post:1") for u in range(30)])
    await s.close()
    held = []
    for path in (db, counts_path(db)):
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute("CREATE TABLE IF NOT EXISTS left_behind (x)")
        conn.execute("INSERT INTO left_behind VALUES (1)")
        held.append(conn)
    try:
        assert all(Path(f"{p}-wal").stat().st_size > 0 for p in (db, counts_path(db)))
        s = SqliteStore(db)
        await s.start()
        try:
            assert [Path(f"{p}-wal").stat().st_size for p in (db, counts_path(db))] == [0, 0]
        finally:
            await s.close()
    finally:
        for conn in held:
            conn.close()
