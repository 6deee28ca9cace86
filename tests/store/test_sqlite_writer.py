"""The group-commit writer: batching, isolation of a failing job, rollback of in-memory effects."""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import pytest

from tally.core.errors import Unavailable
from tally.store.sqlite.schema import connect
from tally.store.sqlite.writer import GroupCommitWriter, JobFn, Tx
from tests.helpers import writer_held

pytestmark = pytest.mark.anyio


def table_opener(path: Path) -> Callable[[], sqlite3.Connection]:
    """Opens the writer's connection to ``path`` with table ``t``."""
    def open_db() -> sqlite3.Connection:
        conn = connect(path, "FULL")
        conn.execute("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        return conn

    return open_db


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[GroupCommitWriter]:
    w = GroupCommitWriter(table_opener(tmp_path / "w.db"), max_ops=1000)
    w.start()
    yield w
    await w.stop()


def insert(k: int, v: str | None = "x") -> JobFn:
    def job(conn: sqlite3.Connection, tx: Tx) -> int:
        conn.execute("INSERT INTO t VALUES (?, ?)", (k, v))
        return k

    return job


def rows(conn_path: Path) -> list[tuple[int, str]]:
    conn = sqlite3.connect(str(conn_path))
    try:
        return conn.execute("SELECT k, v FROM t ORDER BY k").fetchall()
    finally:
        conn.close()


async def test_concurrent_jobs_share_commits(writer: GroupCommitWriter, tmp_path: Path) -> None:
    results: list[int] = []

    async def one(k: int) -> None:
        results.append(await writer.run(insert(k)))

    async with anyio.create_task_group() as tg, writer_held(writer):
        for k in range(200):
            tg.start_soon(one, k)
    assert sorted(results) == list(range(200))
    assert writer.committed_ops == 201  # and the holding job
    assert writer.commits == 2  # the holding job, then every job queued behind it
    assert len(rows(tmp_path / "w.db")) == 200


async def test_weight_bounds_a_batch(tmp_path: Path) -> None:
    w = GroupCommitWriter(lambda: connect(tmp_path / "b.db", "FULL"), max_ops=10)
    w.start()
    try:
        def noop(conn: sqlite3.Connection, tx: Tx) -> None:
            return None

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(w.run, noop, 5)
        assert w.committed_ops == 50
        assert w.commits >= 5  # at most two jobs of weight 5 fit in a batch of 10
    finally:
        await w.stop()


async def test_a_failing_job_fails_alone(writer: GroupCommitWriter, tmp_path: Path) -> None:
    done: list[int] = []
    undone: list[int] = []

    def tracked(k: int, fail: bool) -> JobFn:
        def job(conn: sqlite3.Connection, tx: Tx) -> int:
            conn.execute("INSERT INTO t VALUES (?, 'x')", (k,))
            done.append(k)  # an in-memory effect, undone by the rollback action below
            tx.on_rollback.append(lambda: undone.append(k))
            if fail:
                conn.execute("INSERT INTO t VALUES (?, NULL)", (k + 1000,))  # NOT NULL fails
            return k

        return job

    outcomes: dict[int, object] = {}

    async def one(k: int) -> None:
        try:
            outcomes[k] = await writer.run(tracked(k, fail=k % 5 == 0))
        except sqlite3.IntegrityError as exc:
            outcomes[k] = exc

    async with anyio.create_task_group() as tg, writer_held(writer):
        for k in range(1, 21):
            tg.start_soon(one, k)
    failed = {k for k, v in outcomes.items() if isinstance(v, Exception)}
    assert failed == {5, 10, 15, 20}
    assert [k for k, _ in rows(tmp_path / "w.db")] == [k for k in range(1, 21) if k not in failed]
    # The failed jobs' in-memory effects are undone, the others' kept. (The writer may run a batch
    # twice: first without savepoints, then isolated after a failure, undoing the first run.)
    net = Counter(done)
    net.subtract(undone)
    assert {k for k, n in net.items() if n} == set(range(1, 21)) - failed
    assert all(n in (0, 1) for n in net.values())
    assert writer.commits == 2  # the holding job, then the twenty together


async def test_submit_before_start_is_unavailable(tmp_path: Path) -> None:
    w = GroupCommitWriter(lambda: connect(tmp_path / "c.db", "FULL"), max_ops=10)
    with pytest.raises(Unavailable):
        w.submit(insert(1))


async def test_a_job_queued_behind_stop_is_refused_not_lost(writer: GroupCommitWriter) -> None:
    """A request that races shutdown gets an error, instead of waiting forever."""
    async with anyio.create_task_group() as tg, writer_held(writer):
        queued = writer.submit(insert(1))  # before stop: still committed
        tg.start_soon(writer.stop)
        await anyio.sleep(0)  # the stop marker is queued, the thread is still busy
        with pytest.raises(Unavailable):
            writer.submit(insert(2))
    with anyio.fail_after(10):
        assert await queued == 1
    with pytest.raises(Unavailable):
        writer.submit(insert(3))


@pytest.mark.parametrize("slow_s", [0.0, float("inf")])
async def test_commits_at_or_over_the_slow_bound_are_counted_and_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, slow_s: float) -> None:
    w = GroupCommitWriter(table_opener(tmp_path / "s.db"), name="likes-test",
                          slow_commit_s=slow_s)
    w.start()
    try:
        with caplog.at_level("WARNING", logger="tally.sqlite.writer"):
            for k in range(3):
                await w.run(insert(k))
    finally:
        await w.stop()
    logged = [r for r in caplog.records if r.getMessage() == "slow commit"]
    expected = w.commits if slow_s == 0.0 else 0
    assert w.commits == 3 and w.slow_commits == expected and len(logged) == expected
    for record in logged:
        assert record.writer == "likes-test" and record.jobs == 1  # type: ignore[attr-defined]
        assert record.commit_ms >= 0  # type: ignore[attr-defined]
