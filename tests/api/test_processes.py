"""``tally serve`` with two API processes on embedded SQLite: both answer on the one port, every
acknowledged like is counted once whichever process took it, a killed API process is replaced,
and a stop stops them all."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import ServerFactory
from tests.helpers import recount, stored


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _listeners(port: int) -> set[int]:
    """The socket inodes listening on ``port`` (state 0A) on loopback."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            inodes.add(int(fields[9]))
    return inodes


def _api_processes(server_pid: int, port: int) -> list[int]:
    """The first process's children that hold a socket listening on the port."""
    found = []
    listening = {f"socket:[{i}]" for i in _listeners(port)}
    for child in _children(server_pid):
        try:
            links = {os.readlink(f) for f in Path(f"/proc/{child}/fd").iterdir()}
        except OSError:
            continue
        if links & listening:
            found.append(child)
    return found


def _wait(predicate: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _first_process_answers(url: str) -> bool:
    """A fresh connection: the kernel picks the process. Only the first reports the others."""
    with httpx.Client(base_url=url, timeout=10) as c:
        return "tally_api_processes 2.0" in c.get("/metrics").text


def test_two_api_processes_share_the_port_and_the_writer(server_factory: ServerFactory) -> None:
    server = server_factory(env={"TALLY_WORKERS": "2", "TALLY_AGGREGATE_WINDOW_MS": "5"}).start()
    assert server.proc is not None
    pid = server.proc.pid
    _wait(lambda: len(_api_processes(pid, server.port)) == 1, "the second process")
    seen = {_first_process_answers(server.url) for _ in range(40)}
    assert seen == {True, False}, "both processes answer on the port"

    acked = 0
    for user in range(60):  # a fresh connection each: likes land on both processes
        with httpx.Client(base_url=server.url, timeout=10) as c:
            r = c.post("/v1/like", json={"user_id": user, "item_type": "post", "item_id": "p"})
            assert r.status_code == 200, r.text
            acked += r.json()["changed"]
            assert r.json()["count"] == acked  # exact: one writer, whichever process asked

    def counted() -> bool:
        counts = []
        for _ in range(6):
            with httpx.Client(base_url=server.url, timeout=10) as c:
                r = c.post("/v1/counts", json={"items": [{"item_type": "post", "item_id": "p"}],
                                               "counters": ["like"], "user_id": 59})
                result = r.json()["results"][0]
                assert result["has"]["like"] is True
                counts.append(result["counts"]["like"])
        return counts == [acked] * 6

    _wait(counted, "both processes to read the aggregated count")

    other = _api_processes(pid, server.port)[0]
    os.kill(other, signal.SIGKILL)
    _wait(lambda: (found := _api_processes(pid, server.port)) != [] and found != [other],
          "a new second process")

    def restart_counted() -> bool:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            return "tally_api_process_restarts_total 1.0" in c.get("/metrics").text

    _wait(restart_counted, "the first process to count the restart")

    children = _children(pid)
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(30)
    _wait(lambda: not any(Path(f"/proc/{pid}").exists() for pid in children),
          "every child to exit")
    db = server.data_dir / "tally.db"
    assert stored(db)[("like", "post:p")] == acked == recount(db)[("like", "post:p")]
