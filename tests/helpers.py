"""Small helpers shared by the tests: reading the database directly, and bounded polling."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
from fastapi import FastAPI

from tally.bootstrap import Runtime
from tally.core.model import ToggleOp
from tally.store.sqlite_writer import GroupCommitWriter, Tx

CountMap = dict[tuple[str, str], int]


def db_rows(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Rows read over a fresh connection (WAL lets it read while the service writes)."""
    conn = sqlite3.connect(str(db), timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def recount(db: Path) -> CountMap:
    """The truth: users whose toggle is on, per (counter, item)."""
    rows = db_rows(db, "SELECT counter, item, count(*) FROM toggles WHERE state=1 "
                       "GROUP BY counter, item")
    return {(c, i): n for c, i, n in rows}


def stored(db: Path) -> CountMap:
    """The derived count table, zero rows left out (a like and its unlike leave a 0 row)."""
    return {(c, i): n for i, c, n in db_rows(db, "SELECT item, counter, count FROM counts")
            if n}


def db_exec(db: Path, sql: str, params: tuple[Any, ...] = ()) -> None:
    """Write behind the service's back, to inject drift."""
    conn = sqlite3.connect(str(db), timeout=30, isolation_level=None)
    try:
        conn.execute(sql, params)
    finally:
        conn.close()


def like(user: str | int, item: str, on: bool = True, counter: str = "like") -> ToggleOp:
    return ToggleOp(counter=counter, item=item, user=str(user), on=on, region="local")


async def poll(check: Callable[[], Awaitable[bool]], timeout_s: float = 20.0,
               interval_s: float = 0.02) -> None:
    """Wait until ``check`` is true, at most ``timeout_s``; fails the test otherwise."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await anyio.sleep(interval_s)


def poll_sync(check: Callable[[], bool], timeout_s: float = 20.0, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(interval_s)


@asynccontextmanager
async def writer_held(writer: GroupCommitWriter) -> AsyncIterator[None]:
    """Holds the writer thread inside a job: jobs submitted meanwhile share the next commit."""
    started, release = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection, tx: Tx) -> None:
        started.set()
        release.wait(30)

    held = writer.submit(hold)
    await anyio.to_thread.run_sync(started.wait, 30)
    try:
        yield
        for _ in range(5):  # let the tasks started in the block submit their jobs
            await anyio.sleep(0)
    finally:
        release.set()
        await held


def runtime_of(client: httpx.AsyncClient) -> Runtime:
    """The runtime behind the in-process app of the ``client`` fixture."""
    app: FastAPI = vars(client)["app"]
    rt: Runtime = app.state.runtime
    return rt


def snapshot(db: Path) -> dict[str, list[Any]]:
    """Every row the write path may touch, to show that a refused request wrote nothing."""
    tables = ("toggles", "changelog", "counts", "idempotency", "rollups", "watermarks")
    return {t: db_rows(db, f"SELECT * FROM {t} ORDER BY 1, 2, 3") for t in tables}
