"""The storage-fault harness: the embedded server on a ``FaultFS`` mount, a client ledger, the checks.

The server runs in a process group of its own, so a power cut can SIGKILL every process of it
(the HTTP server and its likes writer child) at once, before the filesystem drops what they had not
synced. The ledger holds what the clients were told; after a fault the checks read everything back.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx

from tally.store.sqlite.schema import counts_path
from tally_dev.engines import free_port
from tests.helpers import poll, recount

WORKERS, USERS_PER_WORKER, ITEMS = 8, 10, 6
Pair = tuple[int, int]  # (user, item)


class Server:
    """``tally serve`` on ``data_dir``, the leader of its own process group."""

    def __init__(self, data_dir: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.log = log
        self.port = free_port()
        self.env = {**os.environ, "TALLY_DATA_DIR": str(data_dir), "TALLY_PORT": str(self.port),
                    "TALLY_LOG_LEVEL": "WARNING", "TALLY_AGGREGATE_WINDOW_MS": "5",
                    **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db(self) -> Path:
        return self.data_dir / "tally.db"

    def start(self, timeout_s: float = 60.0) -> Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tally.cli", "serve"], env=self.env,
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.kill_all()
        raise TimeoutError(f"server not ready: {self.log.read_text()[-3000:]}")

    def kill_all(self) -> None:
        """SIGKILL every process of the server's group, and wait until none is left."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self.proc.wait(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.02)
        else:
            raise RuntimeError(f"processes of group {pgid} outlived SIGKILL")
        self.proc = None

    def stop(self) -> None:
        """A clean stop (SIGTERM), then SIGKILL for whatever is left."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        self.kill_all()


@dataclass
class Ledger:
    """What the clients were told: each pair's last acknowledged state, the ops whose answer never
    came or was an error (either outcome is then correct), and when each answer arrived."""

    acked: dict[Pair, bool] = field(default_factory=dict)
    in_doubt: dict[Pair, set[bool]] = field(default_factory=dict)  # states it may now hold
    acks: int = 0
    refused: int = 0  # answered 503
    sent_after_refusal: int = 0  # requests sent after the first 503 ...
    acked_after_refusal: int = 0  # ... and of those, acknowledged
    first_refusal: float | None = None

    def sent(self, pairs: dict[Pair, bool]) -> float:
        for pair, on in pairs.items():
            self.in_doubt.setdefault(pair, set()).add(on)
        if self.first_refusal is not None:
            self.sent_after_refusal += 1
        return time.monotonic()

    def answered(self, pairs: dict[Pair, bool], status: int, sent_at: float) -> None:
        if status == 200:
            for pair, on in pairs.items():
                del self.in_doubt[pair]
                self.acked[pair] = on
            self.acks += 1
            if self.first_refusal is not None and sent_at > self.first_refusal:
                self.acked_after_refusal += 1
        elif status == 503:
            self.refused += 1
            if self.first_refusal is None:
                self.first_refusal = time.monotonic()
        else:
            raise AssertionError(f"unexpected status {status}")


def _body(pair: Pair) -> dict[str, Any]:
    return {"user_id": pair[0], "item_type": "post", "item_id": pair[1]}


async def load(url: str, ledger: Ledger, seed: int, stop: anyio.Event, max_ops: int = 10_000,
               pause_on_refusal_s: float = 0.0) -> None:
    """Mixed likes and unlikes, singles and bulks, until ``stop`` or the server is gone. Each
    worker owns its users, so the ops on one pair are sequential and the ledger is exact."""
    async def worker(w: int) -> None:
        rng = random.Random(seed * 1000 + w)
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            for _ in range(max_ops):
                if stop.is_set():
                    return
                n = 1 if rng.random() < 0.8 else rng.randint(2, 6)
                pairs: dict[Pair, bool] = {}
                while len(pairs) < n:
                    pairs[(w * USERS_PER_WORKER + rng.randrange(USERS_PER_WORKER),
                           rng.randrange(ITEMS))] = rng.random() < 0.6
                sent_at = ledger.sent(pairs)
                try:
                    if n == 1:
                        (pair, on), = pairs.items()
                        r = await c.post("/v1/like" if on else "/v1/unlike", json=_body(pair))
                    else:
                        r = await c.post("/v1/bulk", json={"ops": [
                            {"op": "like" if on else "unlike", **_body(p)}
                            for p, on in pairs.items()]})
                except httpx.TransportError:
                    return  # the server died: these ops' fate is unknown
                ledger.answered(pairs, r.status_code, sent_at)
                if r.status_code == 503 and pause_on_refusal_s:
                    await anyio.sleep(pause_on_refusal_s)

    async with anyio.create_task_group() as tg:
        for w in range(WORKERS):
            tg.start_soon(worker, w)


@dataclass
class Check:
    losses: int  # acknowledged states not read back
    resolved: int  # in-doubt ops whose outcome the read settled
    drift: bool  # the served counts never came to equal a recount of the like records


def integrity(db: Path) -> list[str]:
    """``PRAGMA integrity_check`` of both database files, over fresh connections."""
    problems = []
    for path in (db, counts_path(db)):
        conn = sqlite3.connect(str(path), timeout=30)
        try:
            result = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        finally:
            conn.close()
        if result != ["ok"]:
            problems.append(f"{path.name}: {result[:5]}")
    return problems


async def read_back(url: str, ledger: Ledger) -> tuple[int, int]:
    """Reads every pair back through ``/v1/has``; settles the in-doubt ones. Returns the
    acknowledged states lost (an older state came back) and the in-doubt ops settled."""
    losses = resolved = 0
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        items = [{"item_type": "post", "item_id": i} for i in range(ITEMS)]
        for user in range(WORKERS * USERS_PER_WORKER):
            r = await c.post("/v1/has", json={"user_id": user, "items": items})
            assert r.status_code == 200, r.text
            for item, got in enumerate(x["on"] for x in r.json()["results"]):
                pair = (user, item)
                before = ledger.acked.get(pair, False)
                if pair in ledger.in_doubt:
                    if got not in {before} | ledger.in_doubt.pop(pair):
                        losses += 1  # an older state came back: the acknowledged one is lost
                    resolved += 1
                elif got is not before:
                    losses += 1
                ledger.acked[pair] = got
    return losses, resolved


def ledger_counts(ledger: Ledger) -> list[int]:
    """The like count of each item by the ledger (after ``read_back`` settled every pair)."""
    return [sum(on for (_, i), on in ledger.acked.items() if i == item) for item in range(ITEMS)]


async def served_counts(c: httpx.AsyncClient) -> list[int]:
    items = [{"item_type": "post", "item_id": i} for i in range(ITEMS)]
    r = await c.post("/v1/counts", json={"items": items, "counters": ["like"]})
    assert r.status_code == 200, r.text
    return [x["counts"]["like"] for x in r.json()["results"]]


async def check_recovered(server: Server, ledger: Ledger) -> Check:
    """Reads every pair back (``read_back``), then whether the counts converge to a recount of
    the like records; both files must be sound."""
    losses, resolved = await read_back(server.url, ledger)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        truth = recount(server.db)
        expected = [truth.get(("like", f"post:{i}"), 0) for i in range(ITEMS)]
        assert expected == ledger_counts(ledger)

        async def converged() -> bool:
            return await served_counts(c) == expected

        try:
            await poll(converged, timeout_s=30)
            drift = False
        except AssertionError:  # poll's timeout: the callers assert or report it
            drift = True
    assert integrity(server.db) == []
    return Check(losses, resolved, drift)


def report(name: str, **figures: Any) -> None:
    """Appends a result line to $TALLY_FAULTS_REPORT (the docs' figures come from there)."""
    line = json.dumps({"test": name, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       **figures})
    print(line)
    target = os.environ.get("TALLY_FAULTS_REPORT")
    if target:
        with open(target, "a") as f:
            f.write(line + "\n")
