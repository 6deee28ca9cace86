"""The client ledger: mixed like/unlike load through every API, with each acknowledged state kept.

Each (user, item) pair belongs to one client, which writes it sequentially, so the last
acknowledged operation is the pair's state. A request that fails or times out (its outcome
unknown) is sent again until acknowledged: like and unlike set a state, so a retry cannot count
twice, and the ledger stays exact. What the clients saw is kept too: every error by kind, and for
every operation how long it took from its first attempt to its acknowledgement; the longest of
those is the write-unavailability window a user would have lived through.

After a fault, ``verify`` reads every pair back (has-liked) and compares each item's count with
the recount of the ledger, until they match or the deadline passes.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

TIMEOUT_S = 10.0  # per request; the API itself waits up to postgres_failover_s for a primary


@dataclass
class Ledger:
    urls: list[str]
    users: int = 300
    items: int = 40
    clients: int = 8
    item_base: int = 0  # item ids item_base..item_base+items-1: each run on items of its own
    state: dict[tuple[int, int], bool] = field(default_factory=dict)
    acked: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    read_errors: Counter[str] = field(default_factory=Counter)
    reads: int = 0
    retried_s: list[float] = field(default_factory=list)  # first attempt -> ack, ops retried
    writes: list[tuple[float, float]] = field(default_factory=list)  # (started, took), wall s
    slowest_write_s: float = 0.0  # first attempt -> acknowledgement, worst operation
    slowest_write_at: float = 0.0
    slowest_read_s: float = 0.0
    failing_since: float | None = None
    _stop: bool = False

    def error(self, kind: str) -> None:
        self.errors[kind] += 1

    async def _send(self, http: httpx.AsyncClient, path: str, body: dict[str, Any],
                    errors: Counter[str]) -> httpx.Response:
        """Until acknowledged (2xx), over any API; returns the acknowledged response."""
        while True:
            url = random.choice(self.urls)
            try:
                r = await http.post(f"{url}{path}", json=body, timeout=TIMEOUT_S)
                if r.status_code == 200:
                    return r
                errors[f"HTTP {r.status_code}"] += 1
            except httpx.TransportError as exc:
                errors[type(exc).__name__] += 1
            await asyncio.sleep(0.1)

    async def client(self, n: int) -> None:
        rng = random.Random(n)
        mine = [(u, i) for u in range(self.users) for i in range(self.items)
                if (u * self.items + i) % self.clients == n]
        async with httpx.AsyncClient() as http:
            while not self._stop:
                user, item = rng.choice(mine)
                on = not self.state.get((user, item), False) if rng.random() < 0.8 else True
                started = time.monotonic()
                op_errors: Counter[str] = Counter()
                await self._send(http, "/v1/like" if on else "/v1/unlike",
                                 {"user_id": user, "item_type": "post",
                                  "item_id": self.item_base + item},
                                 op_errors)
                took = time.monotonic() - started
                self.writes.append((time.time() - took, took))
                if op_errors:
                    self.errors.update(op_errors)
                    self.retried_s.append(took)
                if took > self.slowest_write_s:
                    self.slowest_write_s, self.slowest_write_at = took, time.time() - took
                self.state[(user, item)] = on
                self.acked += 1

    async def reader(self) -> None:
        """Count reads all along: how long the slowest took, and what failed."""
        rng = random.Random(-1)
        async with httpx.AsyncClient() as http:
            while not self._stop:
                items = rng.sample(range(self.items), min(20, self.items))
                started = time.monotonic()
                await self._send(http, "/v1/counts", {"items": self._items(items),
                                                      "counters": ["like"]}, self.read_errors)
                self.slowest_read_s = max(self.slowest_read_s, time.monotonic() - started)
                self.reads += 1
                await asyncio.sleep(0.05)

    def _items(self, indexes: Iterable[int]) -> list[dict[str, Any]]:
        return [{"item_type": "post", "item_id": self.item_base + i} for i in indexes]

    def start(self) -> list[asyncio.Task[None]]:
        self._stop = False
        return ([asyncio.create_task(self.client(n)) for n in range(self.clients)]
                + [asyncio.create_task(self.reader())])

    async def stop(self, tasks: list[asyncio.Task[None]]) -> None:
        """Let every operation in flight finish (be acknowledged), then stop."""
        self._stop = True
        await asyncio.gather(*tasks)

    def expected_counts(self) -> list[int]:
        want = [0] * self.items
        for (_, item), on in self.state.items():
            want[item] += on
        return want

    async def counts(self, http: httpx.AsyncClient, url: str) -> list[int]:
        r = await http.post(f"{url}/v1/counts", json={"items": self._items(range(self.items)),
                                                      "counters": ["like"]}, timeout=TIMEOUT_S)
        r.raise_for_status()
        return [row["counts"]["like"] for row in r.json()["results"]]

    async def lost(self, http: httpx.AsyncClient, url: str) -> int:
        """Pairs whose stored state is not the last acknowledged one (every user read back)."""
        lost = 0
        for user in range(self.users):
            r = await http.post(f"{url}/v1/has", json={
                "user_id": user, "items": self._items(range(self.items))}, timeout=TIMEOUT_S)
            r.raise_for_status()
            got = [f["on"] for f in r.json()["results"]]
            lost += sum(got[i] != self.state.get((user, i), False) for i in range(self.items))
        return lost

    async def verify(self, url: str, timeout_s: float = 120.0) -> dict[str, Any]:
        """Read back every acknowledged state; wait for the counts to equal the recount."""
        async with httpx.AsyncClient() as http:
            want = self.expected_counts()
            started = time.monotonic()
            got = await self.counts(http, url)
            while got != want and time.monotonic() - started < timeout_s:
                await asyncio.sleep(0.25)
                got = await self.counts(http, url)
            catch_up = time.monotonic() - started
            lost = await self.lost(http, url)
            r = await http.post(f"{url}/v1/admin/reconcile", json={"repair": False}, timeout=120)
            drifts = sum(len(p.get("drifts", [])) for p in _ndjson(r.text))
        differ = {f"post:{self.item_base + i}": (g, w) for i, (g, w) in enumerate(zip(got, want, strict=True))
                  if g != w}
        return {"acked": self.acked, "lost": lost, "differ_served_wanted": differ,
                "drift": sum(abs(g - w) for g, w in zip(got, want, strict=True)),
                "server_recount_drifts": drifts, "catch_up_s": round(catch_up, 2),
                "converged": got == want, "reads": self.reads,
                "slowest_write_s": round(self.slowest_write_s, 2),
                "slowest_read_s": round(self.slowest_read_s, 2),
                "write_errors": dict(self.errors), "read_errors": dict(self.read_errors)}


def _ndjson(text: str) -> list[dict[str, Any]]:
    import orjson

    out = []
    for line in text.splitlines():
        if line.strip():
            value = orjson.loads(line)
            if isinstance(value, dict):
                out.append(value)
    return out
