"""Small helpers shared by the tests: reading the database directly, and bounded polling."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import uvicorn

from tally.api.app import TallyApp
from tally.api.server import GuardedHttpTools
from tally.bootstrap import Runtime
from tally.core.model import ToggleOp
from tally.store.sqlite.schema import counts_path
from tally.store.sqlite.store import SqliteStore
from tally.store.sqlite.writer import GroupCommitWriter, Tx
from tally.store.sqlite.writer_process import WriterConfig, child_main
from tally_dev.engines import free_port

CountMap = dict[tuple[str, str], int]


def _open(db: Path, **kwargs: Any) -> sqlite3.Connection:
    """The like records' file with the counts' file attached, as the service opens them."""
    conn: sqlite3.Connection = sqlite3.connect(str(db), timeout=30, **kwargs)
    if counts_path(db).exists():
        conn.execute("ATTACH DATABASE ? AS counts", (str(counts_path(db)),))
    return conn


def db_rows(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Rows read over a fresh connection (WAL lets it read while the service writes)."""
    conn = _open(db)
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
    conn = _open(db, isolation_level=None)
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
async def open_sqlite(path: Path, likes_shards: int = 1) -> AsyncIterator[SqliteStore]:
    """A started SqliteStore (FULL durability, as in production), closed when the block ends."""
    store = SqliteStore(path, likes_shards=likes_shards)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


def child_with_failing_fsync(sock: socket.socket, config: WriterConfig) -> None:
    """The likes writer's child process with ``fdatasync`` failing as on a dying disk (EIO):
    a test puts it in place of ``writer_process.child_main``, which a spawned child is started
    through by name."""
    def eio(fd: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    os.fdatasync = eio
    child_main(sock, config)


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


@asynccontextmanager
async def app_client(app: TallyApp) -> AsyncIterator[httpx.AsyncClient]:
    """The app in this process, lifespan included, over httpx's ASGI transport. The client keeps
    the app as ``client.app``, where ``runtime_of`` finds it."""
    async with app.lifespan():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tally") as c:
            c.app = app  # type: ignore[attr-defined]
            yield c


def runtime_of(client: httpx.AsyncClient) -> Runtime:
    """The runtime behind the in-process app of the ``client`` fixture."""
    app: TallyApp = vars(client)["app"]
    rt: Runtime = app.runtime  # type: ignore[assignment]
    return rt


def snapshot(db: Path) -> dict[str, list[Any]]:
    """Every row the write path may touch, to show that a refused request wrote nothing."""
    tables = ("toggles", "changelog", "counts", "idempotency", "rollups", "watermarks")
    return {t: db_rows(db, f"SELECT * FROM {t} ORDER BY 1, 2, 3") for t in tables}


@asynccontextmanager
async def uvicorn_serving(app: TallyApp, options: dict[str, Any]) -> AsyncIterator[int]:
    """The app under a real uvicorn server in this process, on a free loopback port, with the
    options ``tally serve`` gives it (``uvicorn_options``: the guarded protocol); yields the port,
    and forgets the guard's per-client connection counts when it stops."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                           lifespan="on", **options))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        await task
        GuardedHttpTools.open_by_client.clear()
