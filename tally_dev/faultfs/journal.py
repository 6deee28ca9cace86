"""What has not been synced, per file, and how to lose it: the model of a power cut.

Writes go straight to the backing file (reads then need no merging), and for each write the journal
keeps what it overwrote: the old bytes of the range, and how far the write reached past the old end
of file. A successful fsync of the file forgets its records: they are durable. A power cut
restores, newest first, every record not yet synced (old bytes back, the reach past the old end
zeroed), then cuts the file to its size at its last sync: the file is then byte for byte what it
was when last synced, with every later write gone, as Jepsen's LazyFS drops its unsynced page cache.

A failed fsync (injected) dooms the file's unsynced records: a later fsync that succeeds does not
make them durable, as on Linux, where a failed writeback marks the pages clean and the next fsync
reports success. Metadata (create, rename, unlink) is durable at once: the model is of file data.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Record:
    seq: int  # global order of the writes, for undoing newest first
    offset: int
    old: bytes  # the bytes the write overwrote (within the old end of file)
    length: int  # how far it reached from offset: past len(old) the file was extended


@dataclass
class _File:
    fd: int  # our own descriptor: the inode outlives any renames while we hold it
    name: str  # the last path it was opened by, for reports and fault matching
    synced_size: int
    records: list[_Record] = field(default_factory=list)
    doomed: list[_Record] = field(default_factory=list)  # unsynced past a failed fsync


class Journal:
    """Thread-safe: FUSE calls arrive on several threads."""

    def __init__(self) -> None:
        self._files: dict[int, _File] = {}  # by inode of the backing file
        self._lock = threading.Lock()
        self._seq = 0
        self.syncs = 0
        self.failed_syncs = 0
        self.dropped_bytes = 0  # unsynced bytes undone by power cuts
        self.cuts = 0

    def _file(self, fd: int, name: str) -> _File:
        st = os.fstat(fd)
        f = self._files.get(st.st_ino)
        if f is None:
            f = self._files[st.st_ino] = _File(os.dup(fd), name, st.st_size)
        f.name = name
        return f

    def write(self, fd: int, name: str, data: bytes, offset: int) -> int:
        """Writes ``data`` at ``offset`` of the backing file, remembering what it overwrote."""
        with self._lock:
            f = self._file(fd, name)
            size = os.fstat(fd).st_size
            old = os.pread(fd, max(0, min(len(data), size - offset)), offset) if offset < size else b""
            self._seq += 1
            f.records.append(_Record(self._seq, offset, old, len(data)))
            return os.pwrite(fd, data, offset)

    def truncate(self, fd: int, name: str, length: int) -> None:
        with self._lock:
            f = self._file(fd, name)
            size = os.fstat(fd).st_size
            self._seq += 1
            if length < size:  # the cut-off tail comes back on a power cut
                f.records.append(_Record(self._seq, length, os.pread(fd, size - length, length),
                                         size - length))
            else:  # the extension (zeros) goes
                f.records.append(_Record(self._seq, size, b"", length - size))
            os.ftruncate(fd, length)

    def sync(self, fd: int, name: str) -> None:
        """The file's writes so far are durable (those doomed by a failed sync excepted)."""
        with self._lock:
            f = self._file(fd, name)
            f.records.clear()
            f.synced_size = os.fstat(fd).st_size
            self.syncs += 1

    def fail_sync(self, fd: int, name: str) -> None:
        """A failed fsync: the unsynced writes so far are lost at the next power cut whatever
        syncs later."""
        with self._lock:
            f = self._file(fd, name)
            f.doomed.extend(f.records)
            f.records.clear()
            self.failed_syncs += 1

    def forget(self, ino: int) -> None:
        """The file was unlinked for good: nothing of it can come back."""
        with self._lock:
            f = self._files.pop(ino, None)
            if f is not None:
                os.close(f.fd)

    def unsynced(self) -> dict[str, int]:
        """Bytes written and not durable, per file name."""
        with self._lock:
            return {f.name: sum(r.length for r in f.records + f.doomed)
                    for f in self._files.values() if f.records or f.doomed}

    def cut(self) -> int:
        """The power cut: every file back to its last synced contents; returns bytes undone."""
        with self._lock:
            undone = 0
            for f in self._files.values():
                for r in sorted(f.records + f.doomed, key=lambda r: r.seq, reverse=True):
                    os.pwrite(f.fd, r.old + bytes(r.length - len(r.old)), r.offset)
                    undone += r.length
                os.ftruncate(f.fd, f.synced_size)
                os.fsync(f.fd)
                os.close(f.fd)
            self._files.clear()
            self.dropped_bytes += undone
            self.cuts += 1
            return undone
