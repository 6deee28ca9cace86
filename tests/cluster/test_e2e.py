"""End to end: the `tally cluster up` set of processes under mixed load, with crashes.

Two API processes, one relay and two aggregators on two PostgreSQL servers, NATS JetStream and
Redis. Mid-load one aggregator and one API process are SIGKILLed. Afterwards every acknowledged
write must be there (has-liked answers the last acknowledged state of every pair), and every count
must equal the recount of the toggles: above it would be a double apply, below a lost event.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import pytest

from tally_dev.cluster import DevCluster, Layout
from tests.engines import require

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.slow]

USERS, ITEMS, CLIENTS = 400, 60, 12
LOAD_S, MAX_OPS = 14.0, 20_000


@pytest.fixture
def cluster(engines_dir: Path) -> Iterator[DevCluster]:
    for engine in ("postgres", "redis", "nats"):
        require(engine)
    dev = DevCluster(engines_dir / "e2e-cluster", Layout(partitions=8),
                     settings={"aggregate_window_ms": 20.0, "lease_period_ms": 200.0,
                               "log_level": "WARNING"})
    dev.up()
    try:
        yield dev
    finally:
        dev.down()


@dataclass
class Load:
    """Each (user, item) pair belongs to one client, which writes it sequentially: the last
    acknowledged op is the pair's state. A request whose outcome is unknown (its server died) is
    retried until acknowledged, so the expected state stays exact (toggles are idempotent)."""

    urls: list[str]
    state: dict[tuple[int, int], bool] = field(default_factory=dict)
    acked: int = 0
    failed: int = 0
    reads: int = 0
    over: list[str] = field(default_factory=list)
    # Users who ever sent a like for each item: no count may ever exceed it, converged or not
    # (a pending unlike may keep a count above the current likers, never above this).
    ever: dict[int, set[int]] = field(default_factory=dict)

    async def send(self, http: httpx.AsyncClient, path: str, body: dict[str, object],
                   deadline: float) -> httpx.Response:
        while True:
            url = random.choice(self.urls)
            try:
                r = await http.post(f"{url}{path}", json=body, timeout=5.0)
                if r.status_code == 200:
                    return r
            except httpx.TransportError:
                pass
            self.failed += 1
            assert time.monotonic() < deadline + 30, f"{path} never acknowledged"
            await asyncio.sleep(0.05)

    async def client(self, n: int, stop_at: float) -> None:
        rng = random.Random(n)
        mine = [(u, i) for u in range(USERS) for i in range(ITEMS) if (u * ITEMS + i) % CLIENTS == n]
        async with httpx.AsyncClient() as http:
            while time.monotonic() < stop_at and self.acked < MAX_OPS:
                if rng.random() < 0.25:
                    await self.read(http, rng, stop_at)
                    continue
                user, item = rng.choice(mine)
                on = not self.state.get((user, item), False) if rng.random() < 0.8 else True
                if on:
                    self.ever.setdefault(item, set()).add(user)
                await self.send(http, "/v1/like" if on else "/v1/unlike",
                                {"user_id": user, "item_type": "post", "item_id": item}, stop_at)
                self.state[(user, item)] = on
                self.acked += 1

    async def read(self, http: httpx.AsyncClient, rng: random.Random, stop_at: float) -> None:
        items = rng.sample(range(ITEMS), 50)
        r = await self.send(http, "/v1/counts", {"items": [
            {"item_type": "post", "item_id": i} for i in items], "counters": ["like"]}, stop_at)
        self.reads += 1
        for i, row in zip(items, r.json()["results"], strict=True):
            if row["counts"]["like"] > len(self.ever.get(i, ())):
                self.over.append(f"post:{i}: {row['counts']['like']} > {len(self.ever.get(i, ()))} likers")


async def recount_matches(load: Load, url: str) -> dict[int, tuple[int, int]]:
    """Items whose served count differs from the number of users whose last acked state is on."""
    want = [0] * ITEMS
    for (_, item), on in load.state.items():
        want[item] += on
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{url}/v1/counts", json={"items": [
            {"item_type": "post", "item_id": i} for i in range(ITEMS)], "counters": ["like"]})
    got = [row["counts"]["like"] for row in r.json()["results"]]
    return {i: (got[i], want[i]) for i in range(ITEMS) if got[i] != want[i]}


async def test_acknowledged_writes_survive_crashes_and_counts_equal_the_recount(
        cluster: DevCluster) -> None:
    load = Load(cluster.urls("api"))
    stop_at = time.monotonic() + LOAD_S
    clients = [asyncio.create_task(load.client(n, stop_at)) for n in range(CLIENTS)]
    await asyncio.sleep(LOAD_S / 3)
    killed_at = time.time()
    cluster.kill("aggregator-0")
    cluster.kill("api-0")
    load.urls = [u for u in load.urls if u != cluster.processes["api-0"].url]
    await asyncio.gather(*clients)
    survivor = load.urls[0]
    assert load.acked > 100, "the load loop barely ran"

    deadline = time.monotonic() + 60
    while diff := await recount_matches(load, survivor):
        assert time.monotonic() < deadline, f"counts never converged: {diff}"
        await asyncio.sleep(0.25)
    assert load.over == [], "a count above the number of users who ever liked: a double apply"

    async with httpx.AsyncClient() as http:
        agg = (await http.get(f"{cluster.processes['aggregator-1'].url}/readyz")).json()
        assert agg["partitions"] == list(range(8))
        resumed = [t - killed_at for t in agg["first_applied_at"].values() if t and t > killed_at]
        print(f"\nacked {load.acked} writes, {load.reads} batch reads, {load.failed} retried; "
              f"taken-over partitions resumed {min(resumed, default=0):.2f}-"
              f"{max(resumed, default=0):.2f} s after the kill")
        for user in range(0, USERS, 7):  # every acknowledged state, read back per user
            r = await http.post(f"{survivor}/v1/has", json={"user_id": user, "items": [
                {"item_type": "post", "item_id": i} for i in range(ITEMS)]})
            want = [load.state.get((user, i), False) for i in range(ITEMS)]
            assert [f["on"] for f in r.json()["results"]] == want, f"user {user}"
        r = await http.post(f"{survivor}/v1/admin/reconcile", json={"repair": False}, timeout=60)
        progress = [orjson.loads(line) for line in r.text.splitlines() if line]
        assert r.status_code == 200 and progress[-1]["done"]
        assert [d for p in progress for d in p["drifts"]] == []
        assert progress[-1]["checked"] >= sum(1 for n in range(ITEMS) if any(
            on for (_, i), on in load.state.items() if i == n))
