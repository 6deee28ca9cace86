"""Group commit: a failing job fails alone, whether the batch ran with or without savepoints."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tally.store.sqlite.writer import GroupCommitWriter, JobFn, Tx
from tests.helpers import writer_held

pytestmark = pytest.mark.anyio


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[GroupCommitWriter]:
    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(tmp_path / "w.db", isolation_level=None, check_same_thread=False)
        conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
        return conn

    w = GroupCommitWriter(connect, max_ops=100)
    w.start()
    try:
        yield w
    finally:
        await w.stop()


def insert(key: str, fail: bool = False) -> JobFn:
    def job(conn: sqlite3.Connection, tx: Tx) -> str:
        conn.execute("INSERT INTO t VALUES (?)", (key,))
        if fail:
            raise ValueError(f"job {key} failed")
        return key
    return job


async def test_a_failing_job_fails_alone(writer: GroupCommitWriter) -> None:
    async with writer_held(writer):  # the jobs queue behind it and share the next commit
        jobs = [writer.submit(insert(k, fail=k == "b")) for k in "abc"]
    out = await asyncio.gather(*jobs, return_exceptions=True)
    assert out[0] == "a" and out[2] == "c"
    assert isinstance(out[1], ValueError)
    rows = await writer.run(lambda conn, tx: conn.execute("SELECT k FROM t ORDER BY k").fetchall())
    assert rows == [("a",), ("c",)]  # b's row was rolled back with its job
    assert writer.commits == 3  # the holding job, the three together, the read


async def test_a_batch_without_failures_commits_everything(writer: GroupCommitWriter) -> None:
    async with writer_held(writer):
        jobs = [writer.submit(insert(k)) for k in "xyz"]
    out = await asyncio.gather(*jobs)
    assert out == ["x", "y", "z"]
    assert writer.commits == 2  # the holding job, then the three together
