"""``python -m tally_dev.faultfs BACKING MOUNTPOINT CONTROL_SOCKET``: mount, serve faults, exit
when unmounted.

The control socket takes one JSON object per line and answers one per line:
- ``{"cmd": "cut"}``: the power cut (then the filesystem is frozen until unmounted);
- ``{"cmd": "eio", "pattern": "*-wal"}``: the next fsync of a matching file fails;
- ``{"cmd": "full", "on": true}``: no space left;
- ``{"cmd": "lie", "on": true}``: fsync syncs nothing;
- ``{"cmd": "stats"}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
from typing import Any

import mfusepy

from tally_dev.faultfs.fs import FaultOps


def _handle(ops: FaultOps, request: dict[str, Any]) -> dict[str, Any]:
    cmd = request.get("cmd")
    if cmd == "cut":
        return {"ok": True, "undone_bytes": ops.cut()}
    if cmd == "eio":
        ops.fail_next_sync(str(request["pattern"]))
        return {"ok": True}
    if cmd == "full":
        ops.full = bool(request["on"])
        return {"ok": True}
    if cmd == "lie":
        ops.lying = bool(request["on"])
        return {"ok": True}
    if cmd == "stats":
        return {"ok": True, **ops.stats()}
    return {"ok": False, "error": f"unknown command {cmd!r}"}


def _serve(ops: FaultOps, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_session, args=(ops, conn), daemon=True).start()


def _session(ops: FaultOps, conn: socket.socket) -> None:
    with conn, conn.makefile("rwb") as stream:
        for line in stream:
            try:
                answer = _handle(ops, json.loads(line))
            except Exception as exc:  # a bad command is answered, not fatal to the filesystem
                answer = {"ok": False, "error": repr(exc)}
            stream.write(json.dumps(answer).encode() + b"\n")
            stream.flush()


def main(argv: list[str]) -> None:
    backing, mountpoint, control = argv
    logging.basicConfig(level=logging.WARNING)
    ops = FaultOps(backing)
    threading.Thread(target=_serve, args=(ops, control), daemon=True, name="faultfs-control").start()
    # hard_remove: an unlinked file that is still open goes at once (SQLite unlinks its WAL at
    # the last close; no .fuse_hidden files left behind). allow_other: other users' processes
    # (PostgreSQL runs as its own) may use it, the kernel checking permissions as usual.
    mfusepy.FUSE(ops, mountpoint, foreground=True, hard_remove=True, fsname="faultfs",
                 allow_other=True, default_permissions=True)


if __name__ == "__main__":
    main(sys.argv[1:])
