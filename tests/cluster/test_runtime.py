"""The whole vertical slice in one process (role "all"): outbox -> relay -> JetStream ->
partitioned aggregator -> PostgreSQL counts -> Redis -> read path, through the unchanged HTTP API."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tally.api.app import create_app
from tally.cluster_runtime import ClusterRuntime
from tally.settings import Settings
from tests.helpers import app_client

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


@pytest.fixture(params=["redis", "redis-cluster"])
def cluster_settings(request: pytest.FixtureRequest, tmp_path: Path, pg_dsns: list[str],
                     nats_url: str) -> Settings:
    if request.param == "redis":
        redis = {"redis_url": request.getfixturevalue("redis_url")}
    else:
        cluster = request.getfixturevalue("redis_cluster")
        cluster.flushall()
        redis = {"redis_url": cluster.url, "redis_cluster": True}
    return Settings(backend="cluster", postgres_dsns=pg_dsns, nats_url=nats_url, **redis,
                    log_partitions=4, logical_shards=64,
                    data_dir=str(tmp_path / "data"), aggregate_window_ms=5.0,
                    lease_period_ms=100.0, hot_ttl_s=0.05)


@pytest.fixture
async def cluster_client(cluster_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(create_app(cluster_settings)) as c:
        yield c


async def counts_of(c: httpx.AsyncClient, items: list[int]) -> list[int]:
    r = await c.post("/v1/counts", json={"items": [{"item_type": "post", "item_id": i}
                                                   for i in items], "counters": ["like"]})
    assert r.status_code == 200, r.text
    return [row["counts"]["like"] for row in r.json()["results"]]


async def converge(c: httpx.AsyncClient, items: list[int], want: list[int],
                   timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (got := await counts_of(c, items)) != want:
        assert time.monotonic() < deadline, f"counts {got} never reached {want}"
        await asyncio.sleep(0.05)


async def test_likes_flow_through_the_log_to_counts_and_redis(
        cluster_client: httpx.AsyncClient) -> None:
    c = cluster_client
    items = list(range(10))
    want = [0] * 10
    for user in range(30):
        for item in items[: 1 + user % 10]:
            r = await c.post("/v1/like", json={"user_id": user, "item_type": "post",
                                               "item_id": item})
            assert r.status_code == 200 and r.json()["changed"]
            want[item] += 1
    for user in range(5):  # unlikes, and a repeated unlike that changes nothing
        for _ in range(2):
            await c.post("/v1/unlike", json={"user_id": user, "item_type": "post", "item_id": 0})
    want[0] -= 5
    await converge(c, items, want)
    rt = c.app.state.runtime  # type: ignore[attr-defined]
    assert isinstance(rt, ClusterRuntime) and rt.redis is not None
    in_redis = {("like", f"post:{i}"): n for i, n in zip(items, want, strict=True)}
    deadline = time.monotonic() + 10  # written just after each commit
    while await rt.redis.get(list(in_redis)) != in_redis:
        assert time.monotonic() < deadline, "Redis never got the applied counts"
        await asyncio.sleep(0.02)
    r = await c.post("/v1/has", json={"user_id": 3, "counter": "like", "items": [
        {"item_type": "post", "item_id": i} for i in (0, 3, 4)]})
    assert r.status_code == 200, r.text
    ready = await c.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["partitions"] == [0, 1, 2, 3] and len(body["sources"]) == 8
    metrics = (await c.get("/metrics")).text
    assert "tally_partition_events" in metrics and "tally_relay_published" in metrics
    grouped = [float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("tally_group_commit_ops_total ")]
    assert grouped and grouped[0] > 0  # the single likes above went through group commit


@pytest.mark.parametrize("role", ["api", "relay", "aggregator"])
async def test_a_role_runs_only_its_parts_and_reports_its_readiness(
        role: str, tmp_path: Path, pg_dsns: list[str], nats_url: str, redis_url: str) -> None:
    s = Settings(backend="cluster", role=role, postgres_dsns=pg_dsns, nats_url=nats_url,
                 redis_url=redis_url, log_partitions=4, logical_shards=64,
                 data_dir=str(tmp_path / "data"), lease_period_ms=100.0)
    app = create_app(s)
    rt = app.state.runtime
    assert isinstance(rt, ClusterRuntime)
    assert (rt.service is not None, rt.relay is not None, rt.pool is not None) == (
        role == "api", role == "relay", role == "aggregator")
    async with app_client(app) as c:
        deadline = time.monotonic() + 20
        while (ready := await c.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, ready.text
            await asyncio.sleep(0.05)
        body = ready.json()
        assert body["roles"] == [role]
        assert ("partitions" in body, "sources" in body) == (role == "aggregator",
                                                              role == "relay")
        like = await c.post("/v1/like", json={"user_id": 1, "item_type": "post", "item_id": 1})
        assert like.status_code == (200 if role == "api" else 404)
        assert (await c.get("/metrics")).status_code == 200
