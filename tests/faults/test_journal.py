"""The power-cut model (tally_dev.faultfs.journal) on plain files: a cut leaves each file exactly
as it was at its last sync, whatever writes, extensions and truncations came after."""

from __future__ import annotations

import os
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from tally_dev.faultfs.journal import Journal

_op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 300), st.binary(min_size=1, max_size=120)),
    st.tuples(st.just("truncate"), st.integers(0, 400), st.just(b"")),
    st.tuples(st.just("sync"), st.just(0), st.just(b"")),
)


@settings(max_examples=150)
@given(st.binary(max_size=200), st.lists(_op, max_size=25))
def test_a_cut_restores_the_last_synced_contents(initial: bytes, ops: list[tuple[str, int, bytes]]
                                                 ) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "f")
        with open(path, "wb") as f:
            f.write(initial)
        journal = Journal()
        fd = os.open(path, os.O_RDWR)
        durable = initial  # what a power cut must leave
        try:
            for kind, arg, data in ops:
                if kind == "write":
                    journal.write(fd, "f", data, arg)
                elif kind == "truncate":
                    journal.truncate(fd, "f", arg)
                else:
                    journal.sync(fd, "f")
                    durable = os.pread(fd, 1 << 20, 0)
            journal.cut()
            assert os.pread(fd, 1 << 20, 0) == durable
        finally:
            os.close(fd)


def test_writes_before_a_failed_sync_are_lost_even_after_a_later_sync() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "wal")
        fd = os.open(path, os.O_RDWR | os.O_CREAT)
        try:
            journal = Journal()
            journal.write(fd, "wal", b"synced", 0)
            journal.sync(fd, "wal")
            journal.write(fd, "wal", b"-doomed", 6)
            journal.fail_sync(fd, "wal")  # the writeback failed: these bytes never reach the disk
            journal.write(fd, "wal", b"-later", 13)
            journal.sync(fd, "wal")  # succeeds, as Linux's next fsync does
            assert journal.unsynced() == {"wal": 7}
            assert journal.cut() == 7
            assert os.pread(fd, 100, 0) == b"synced" + bytes(7) + b"-later"
        finally:
            os.close(fd)
