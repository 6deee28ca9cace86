"""The likes writer's rounds: a write is answered only after a WAL sync that began after its
commit, the writes that arrive during a round share the next, a failed sync stops the writer, and
derived counts never commit ahead of the like records they came from."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import select
import socket
import sqlite3
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tally.core.errors import Unavailable
from tally.core.model import ToggleOp
from tally.store.sqlite import writer_process
from tally.store.sqlite.schema import connect
from tally.store.sqlite.store import SqliteStore
from tally.store.sqlite.writer import WalSync, syncs_wal_itself
from tally.store.sqlite.writer_process import READY, STOP, WRITE, WriterConfig, _Child

pytestmark = pytest.mark.anyio

_HEADER = struct.Struct("!I")


class GatedSync(WalSync):
    """The likes WAL's real sync, but only once the test lets it; it notes what the server's
    side of the socket had been answered when each sync began."""

    def __init__(self, path: Path, server: socket.socket) -> None:
        super().__init__(path)
        self.server = server
        self.gate = threading.Event()
        self.started = threading.Event()
        self.answered_before: list[bool] = []
        self.fail: OSError | None = None

    def __call__(self) -> None:
        self.answered_before.append(_readable(self.server))
        self.started.set()
        self.gate.wait(10)
        if self.fail is not None:
            raise self.fail
        super().__call__()


def _readable(sock: socket.socket) -> bool:
    """Whether an answer is waiting to be read (looked at, not taken)."""
    return bool(select.select([sock], [], [], 0)[0])


class RunningChild:
    """A likes writer child run on a thread of the test's process, over a socket pair."""

    def __init__(self, db: Path, listen: Path | None = None) -> None:
        self.server, theirs = socket.socketpair()
        self.server.settimeout(10)
        self.child = _Child(WriterConfig(db, listen=listen))
        self.sync = GatedSync(db, self.server)
        self.child.wal_sync = self.sync
        self.thread = threading.Thread(target=self.child.run, args=(theirs,), daemon=True)
        self.thread.start()
        assert self.receive()[:2] == (READY, True)

    def send(self, req_id: int, kind: int, payload: Any) -> None:
        body = pickle.dumps((req_id, kind, payload))
        self.server.sendall(_HEADER.pack(len(body)) + body)

    def like(self, req_id: int, user: int) -> None:
        self.send(req_id, WRITE, [("like", "post:1", f"u{user}", True, "local")])

    def receive(self) -> tuple[Any, ...]:
        (size,) = _HEADER.unpack(self._exactly(_HEADER.size))
        message: tuple[Any, ...] = pickle.loads(self._exactly(size))
        return message

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.server.recv(n - len(data))
            assert chunk, "the child closed its socket"
            data += chunk
        return data

    def stop(self) -> None:
        self.sync.gate.set()
        self.send(0, STOP, None)
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.server.close()


@pytest.fixture
def child(tmp_path: Path) -> Iterator[RunningChild]:
    running = RunningChild(tmp_path / "tally.db")
    yield running
    running.stop()


def open_db(path: Path) -> sqlite3.Connection:
    conn = connect(path, "FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY)")
    return conn


def visible(db: Path) -> int:
    conn = connect(db, "FULL", readonly=True)
    try:
        return int(conn.execute("SELECT count(*) FROM changelog").fetchone()[0])
    finally:
        conn.close()


def test_a_write_is_answered_only_after_its_sync(child: RunningChild, tmp_path: Path) -> None:
    child.like(1, user=1)
    assert child.sync.started.wait(10)
    # Committed (another connection sees it), but not yet synced: not answered.
    assert visible(tmp_path / "tally.db") == 1
    assert child.sync.answered_before == [False] and not _readable(child.server)
    child.sync.gate.set()
    req_id, ok, results, counters = child.receive()
    assert (req_id, ok) == (1, True) and results[0][:2] == (True, 1)
    assert counters[3] == 1  # one sync


def test_writes_that_arrive_during_a_round_share_the_next(child: RunningChild) -> None:
    child.like(1, user=1)
    assert child.sync.started.wait(10)
    for k in range(2, 6):  # the first round is syncing: these wait in the socket
        child.like(k, user=k)
    child.sync.gate.set()
    answers = sorted(child.receive() for _ in range(5))
    assert [a[0] for a in answers] == [1, 2, 3, 4, 5] and all(a[1] for a in answers)
    assert sorted(a[2][0][1] for a in answers) == [1, 2, 3, 4, 5]  # exact counts
    commits, ops, failed, syncs, stopped = answers[-1][3]
    assert (commits, ops, failed, syncs, stopped) == (2, 5, 0, 2, 0)  # two rounds, not five


def test_a_failed_sync_fails_its_round_and_stops_writes(child: RunningChild) -> None:
    child.sync.fail = OSError(errno.EIO, "Input/output error")
    child.sync.gate.set()
    child.like(1, user=1)
    req_id, ok, message, counters = child.receive()
    assert (req_id, ok) == (1, False) and "sync failed" in message and counters[4] == 1
    child.like(2, user=2)
    req_id, ok, message, _counters = child.receive()
    assert (req_id, ok) == (2, False) and "failed sync" in message
    assert child.sync.answered_before == [False]  # the second was never tried


def test_stop_answers_every_write_that_had_arrived(tmp_path: Path) -> None:
    running = RunningChild(tmp_path / "tally.db")
    running.sync.gate.set()
    for k in range(50):
        running.like(k, user=k)
    running.send(0, STOP, None)
    answers = [running.receive() for _ in range(50)]
    assert sorted(a[0] for a in answers) == list(range(50)) and all(a[1] for a in answers)
    running.thread.join(10)
    assert not running.thread.is_alive()
    running.server.close()


def test_a_process_that_takes_no_answers_is_dropped_and_the_others_go_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another API process (``--workers N``) that stops reading its answers cannot hold the
    writer: once its socket is full, a send to it waits ``SEND_TIMEOUT_S`` at most, then the
    child drops it and the server's own writes are answered."""
    monkeypatch.setattr(writer_process, "SEND_TIMEOUT_S", 0.5)
    listen = tmp_path / "likes0.sock"
    running = RunningChild(tmp_path / "tally.db", listen)
    running.sync.gate.set()
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.connect(str(listen))
    for k in range(24):  # answers of 1,000 likes each: far more than a socket buffer holds
        rows = [("like", f"post:{k}", f"u{k}-{n}", True, "local") for n in range(1000)]
        body = pickle.dumps((k + 1, WRITE, rows))
        stuck.sendall(_HEADER.pack(len(body)) + body)
    time.sleep(0.5)  # the child is now blocked on the stuck process's full socket
    running.like(1, user=1)
    req_id, ok, results, _counters = running.receive()
    assert (req_id, ok) == (1, True) and results[0][0] is True
    stuck.settimeout(10)
    ended = False
    try:
        while stuck.recv(1 << 20):  # what was sent before the drop, then the end
            pass
        ended = True
    except ConnectionResetError:  # closed with some of its writes still unread
        ended = True
    assert ended  # the child closed its end (not a timeout)
    stuck.close()
    running.stop()


def test_a_server_that_takes_no_answers_ends_its_writer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's own process, dropped as any other (its event loop stuck, say), starts a new
    writer once it sees the socket close: the old one ends rather than write beside it."""
    monkeypatch.setattr(writer_process, "SEND_TIMEOUT_S", 0.5)
    running = RunningChild(tmp_path / "tally.db")
    running.sync.gate.set()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # dropped meanwhile
        for k in range(24):  # answers of 1,000 likes each, none read
            running.send(k + 1, WRITE, [("like", f"post:{k}", f"u{k}-{n}", True, "local")
                                        for n in range(1000)])
    running.thread.join(10)
    assert not running.thread.is_alive()
    running.server.close()


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


def test_only_full_durability_syncs_the_wal_itself() -> None:
    assert syncs_wal_itself("FULL") and syncs_wal_itself("full")
    assert not syncs_wal_itself("NORMAL") and not syncs_wal_itself("EXTRA")


async def test_counts_commit_after_the_like_records_are_synced(tmp_path: Path) -> None:
    """The counts writer syncs the likes WAL before each commit of its own, so no count can be
    durable ahead of the like that made it."""
    store = SqliteStore(tmp_path / "tally.db")
    await store.start()
    try:
        assert store.syncs_wal_itself and len(store.likes_syncs) == 1
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
    assert not store.syncs_wal_itself and store.likes_syncs == []


@pytest.mark.parametrize(("synchronous", "levels"), [("FULL", (1, 2)), ("EXTRA", (3, 3))])
def test_the_writer_commits_unsynced_only_when_it_syncs_itself(
        tmp_path: Path, synchronous: str, levels: tuple[int, int]) -> None:
    """FULL: NORMAL (1) on the likes writer's own file, whose WAL it syncs once a round, and
    FULL (2) on the counts file it attaches. EXTRA: SQLite's own syncs (3) on both."""
    child = _Child(WriterConfig(tmp_path / "tally.db", synchronous))
    conn = child._open()
    try:
        got = (conn.execute("PRAGMA main.synchronous").fetchone()[0],
               conn.execute("PRAGMA counts.synchronous").fetchone()[0])
        assert got == levels
        assert (child.wal_sync is not None) == (synchronous == "FULL")
    finally:
        conn.close()
