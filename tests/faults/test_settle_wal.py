"""A restart after a failed fsync: what the restarted server can read must survive a power cut.

The failed sync's frames stay readable after the writer dies (the kernel keeps the pages it could
not write, marked clean), and commits made after the failure are appended behind them; a power cut
takes the failed frames and, the WAL's checksums being chained, every later frame with them.
``settle_wal`` (run by the SQLite store at start, before the counts writer) copies the WAL into
the database file and empties it, durably: then whatever was read survives the cut.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tally.store.sqlite.checkpoint import settle_wal
from tally_dev.faultfs import FaultFS

pytestmark = pytest.mark.slow

# Commits a row per line read (the row's number), each in a transaction of its own, and answers
# "ok" or the error; a failed fsync fails that COMMIT, and the later ones go on.
WRITER = textwrap.dedent("""
    import sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t VALUES (?, ?)", (int(line), "x" * 500))
            conn.execute("COMMIT")
            print("ok", flush=True)
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            print(f"error {exc}", flush=True)
""")


def visible_rows(db: Path) -> list[int]:
    """The rows a restarted server would read, through a read-only connection (which, unlike a
    writable one, does not checkpoint the WAL when it closes: that would settle it)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [k for (k,) in conn.execute("SELECT k FROM t ORDER BY k")]
    finally:
        conn.close()


def crash_after_a_failed_sync(faultfs: FaultFS, db: Path) -> list[str]:
    """20 commits, an fsync failure armed, 10 more, then SIGKILL; returns the answers."""
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "ready"
        answers = []
        for k in range(1, 31):
            if k == 21:
                faultfs.fail_next_sync(db.name + "-wal")
            child.stdin.write(f"{k}\n")
            child.stdin.flush()
            answers.append(child.stdout.readline().strip())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        child.stdin.close()
        child.stdout.close()
    return answers


@pytest.mark.parametrize("settle", [True, False], ids=["settled", "control"])
def test_what_a_restart_reads_after_a_failed_sync_survives_a_power_cut(
        faultfs: FaultFS, settle: bool) -> None:
    db = faultfs.mountpoint / "t.db"
    answers = crash_after_a_failed_sync(faultfs, db)
    assert answers[:20] == ["ok"] * 20
    assert answers[20].startswith("error") and "ok" in answers[21:]  # the failure, then more
    read = visible_rows(db)
    assert read[-1] == 30  # everything committed reads back, failed sync or not
    if settle:
        assert settle_wal(db)
    faultfs.cut()
    after = visible_rows(db)
    integrity = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert integrity.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        integrity.close()
    if settle:
        assert after == read
    else:  # the control: without settling, the cut takes the failed frames and all after them
        assert after == list(range(1, 21))
