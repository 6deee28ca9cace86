"""The background checkpointer: commits append to the WAL, another thread copies it over."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

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
