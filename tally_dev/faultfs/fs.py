"""The FUSE side: a pass-through of a backing directory whose file data goes through the ``Journal``.

Faults, set by the control socket (see ``__main__``):
- ``cut``: the power cut. Every unsynced write is undone and the filesystem freezes (every call
  fails with EIO, as a machine without power answers nothing) until it is unmounted; mounting the
  backing directory again is the reboot.
- ``fail_next_sync(pattern)``: the next fsync of a file whose name matches the glob fails with EIO,
  and so does the next fsync through every other descriptor then open on that file (Linux's
  errseq); later fsyncs succeed, though the failed writes never reach the disk (see journal).
- ``full``: no free space: a write or truncate that would grow a file fails with ENOSPC (an
  overwrite within the file's blocks still succeeds, as on a real filesystem), and statfs says so.
- ``lying``: fsync answers success and makes nothing durable (a disk whose cache ignores flushes).
  The tests use it as a control: a ledger check that finds no loss on such a disk is blind.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import threading
from typing import Any

import mfusepy

from tally_dev.faultfs.journal import Journal

_STAT_KEYS = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime", "st_mtime",
              "st_ctime", "st_ino")


def _ino(fd: int) -> int | None:
    try:
        return os.fstat(fd).st_ino
    except OSError:  # closed meanwhile
        return None


def _own(target: str | int) -> None:
    """A new file or directory belongs to the process that made it, not to this daemon (root):
    PostgreSQL, run as its own user, refuses a data directory it does not own."""
    uid, gid, _pid = mfusepy.fuse_get_context()
    os.chown(target, uid, gid)


class FaultOps(mfusepy.Operations):  # type: ignore[misc]
    use_ns = True

    def __init__(self, backing: str) -> None:
        self.backing = os.path.realpath(backing)
        self.journal = Journal()
        self.frozen = False
        self.full = False
        self.lying = False
        self.eio_pattern: str | None = None
        self._names: dict[int, str] = {}  # open descriptor -> the path it was opened by
        self._lock = threading.Lock()
        self._eio_owed: set[int] = set()  # descriptors whose next fsync reports a past failure

    # -- faults -------------------------------------------------------------------------------

    def cut(self) -> int:
        self.frozen = True
        return self.journal.cut()

    def fail_next_sync(self, pattern: str) -> None:
        self.eio_pattern = pattern

    def stats(self) -> dict[str, Any]:
        j = self.journal
        return {"syncs": j.syncs, "failed_syncs": j.failed_syncs, "cuts": j.cuts,
                "dropped_bytes": j.dropped_bytes, "unsynced": j.unsynced(), "full": self.full,
                "eio_armed": self.eio_pattern, "frozen": self.frozen, "lying": self.lying}

    # -- helpers ------------------------------------------------------------------------------

    def _path(self, path: str) -> str:
        if self.frozen:
            raise mfusepy.FuseOSError(errno.EIO)
        return os.path.join(self.backing, path.lstrip("/"))

    def _name(self, fh: int) -> str:
        return self._names.get(fh, "?")

    def _grows(self, fh: int, end: int) -> bool:
        return end > os.fstat(fh).st_size

    # -- metadata -----------------------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.fstat(fh) if fh is not None and not self.frozen else os.lstat(self._path(path))
        attrs: dict[str, Any] = {k: getattr(st, k) for k in _STAT_KEYS}
        for k in ("st_atime", "st_mtime", "st_ctime"):
            attrs[k] = getattr(st, k + "_ns")
        return attrs

    def access(self, path: str, amode: int) -> int:
        if not os.access(self._path(path), amode):
            raise mfusepy.FuseOSError(errno.EACCES)
        return 0

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._path(path))]

    def mkdir(self, path: str, mode: int) -> int:
        target = self._path(path)
        os.mkdir(target, mode)
        _own(target)
        return 0

    def link(self, target: str, source: str) -> int:
        os.link(self._path(source), self._path(target))
        return 0

    def rmdir(self, path: str) -> int:
        os.rmdir(self._path(path))
        return 0

    def chmod(self, path: str, mode: int) -> int:
        os.chmod(self._path(path), mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        os.chown(self._path(path), uid, gid)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        if times is None:
            os.utime(self._path(path))
        else:
            os.utime(self._path(path), ns=times)
        return 0

    def _forget_if_last(self, target: str) -> None:
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            return
        if st.st_nlink == 1:
            self.journal.forget(st.st_ino)

    def unlink(self, path: str) -> int:
        target = self._path(path)
        self._forget_if_last(target)
        os.unlink(target)
        return 0

    def rename(self, old: str, new: str) -> int:
        target = self._path(new)
        self._forget_if_last(target)
        os.rename(self._path(old), target)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._path(path))
        out = {k: getattr(st, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree",
                                            "f_bavail", "f_files", "f_ffree", "f_favail",
                                            "f_namemax")}
        if self.full:
            out["f_bfree"] = out["f_bavail"] = 0
        return out

    # -- file data ----------------------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        # Read-write whatever was asked (the kernel has checked the caller's access): the
        # journal reads what a write overwrites.
        keep = flags & ~(os.O_ACCMODE | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_TRUNC)
        fd = os.open(self._path(path), keep | os.O_RDWR | os.O_CLOEXEC)
        self._names[fd] = path
        if flags & os.O_TRUNC:  # journalled like any truncate
            self.journal.truncate(fd, path, 0)
        return fd

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        fd = os.open(self._path(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        _own(fd)
        self._names[fd] = path
        return fd

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        if self.frozen:
            raise mfusepy.FuseOSError(errno.EIO)
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        if self.frozen:
            raise mfusepy.FuseOSError(errno.EIO)
        if self.full and self._grows(fh, offset + len(data)):
            raise mfusepy.FuseOSError(errno.ENOSPC)
        return self.journal.write(fh, self._name(fh), data, offset)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        if fh is None:
            fd = os.open(self._path(path), os.O_RDWR | os.O_CLOEXEC)
            try:
                return self._truncate(fd, path, length)
            finally:
                os.close(fd)
        return self._truncate(fh, path, length)

    def _truncate(self, fd: int, path: str, length: int) -> int:
        if self.frozen:
            raise mfusepy.FuseOSError(errno.EIO)
        if self.full and self._grows(fd, length):
            raise mfusepy.FuseOSError(errno.ENOSPC)
        self.journal.truncate(fd, path, length)
        return 0

    def fallocate(self, path: str, mode: int, offset: int, size: int, fh: int) -> int:
        raise mfusepy.FuseOSError(errno.EOPNOTSUPP)  # callers fall back to writes, journalled

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        if self.frozen:
            raise mfusepy.FuseOSError(errno.EIO)
        name = self._name(fh)
        with self._lock:
            pattern = self.eio_pattern
            fail = pattern is not None and fnmatch.fnmatch(os.path.basename(name), pattern)
            if fail:
                self.eio_pattern = None
                # As Linux reports a writeback error: once to every descriptor open on the file
                # when it happened, at its next fsync; a descriptor opened later sees none.
                ino = os.fstat(fh).st_ino
                self._eio_owed |= {other for other in list(self._names)
                                   if other != fh and _ino(other) == ino}
            elif fh in self._eio_owed:
                self._eio_owed.discard(fh)
                raise mfusepy.FuseOSError(errno.EIO)
        if fail:
            self.journal.fail_sync(fh, name)
            raise mfusepy.FuseOSError(errno.EIO)
        if not self.lying:
            self.journal.sync(fh, name)
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        return 0  # metadata is durable at once in this model (see journal)

    def flush(self, path: str, fh: int) -> int:
        return 0

    def release(self, path: str, fh: int) -> int:
        self._names.pop(fh, None)
        with self._lock:
            self._eio_owed.discard(fh)
        os.close(fh)
        return 0
