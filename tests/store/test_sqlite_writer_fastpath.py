"""Group commit: a failing job fails alone, whether the batch ran with or without savepoints."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tally.store.sqlite.writer import GroupCommitWriter, JobFn, Tx

pytestmark = pytest.mark.anyio


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[GroupCommitWriter]:
    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(tmp_path / "w.db", isolation_level=None, check_same_thread=False)
        conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
        return conn

    w = GroupCommitWriter(connect, window_s=0.2, max_ops=100)  # wide: the jobs share one commit
    w.start()
    try:
        yield w
    finally:
        await w.stop()


def insert(key: str, fail: bool = False) -> JobFn:
    def job(conn: sqlite3.Connection, tx: Tx) -> str:
        conn.execute("INSERT INTO t VALUES (?)", (key,))
        tx.on_commit.append(lambda: None)
        if fail:
            raise ValueError(f"job {key} failed")
        return key
    return job


async def test_a_failing_job_fails_alone(writer: GroupCommitWriter) -> None:
    out = await asyncio.gather(*(writer.run(insert(k, fail=k == "b")) for k in "abc"),
                               return_exceptions=True)
    assert out[0] == "a" and out[2] == "c"
    assert isinstance(out[1], ValueError)
    rows = await writer.run(lambda conn, tx: conn.execute("SELECT k FROM t ORDER BY k").fetchall())
    assert rows == [("a",), ("c",)]  # b's row was rolled back with its job
    assert writer.commits == 2


async def test_a_batch_without_failures_commits_everything(writer: GroupCommitWriter) -> None:
    out = await asyncio.gather(*(writer.run(insert(k)) for k in "xyz"))
    assert out == ["x", "y", "z"]
    assert writer.commits == 1
