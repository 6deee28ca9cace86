"""The cluster adapters under the contract suites: PostgreSQL shards for the records, the change
log delivered through the relay and the JetStream log by partition workers, and counts read
through Redis (``TieredCounts``). ``pump`` is the real path: ``GroupRelay.step`` per outbox
source, then ``PartitionWorker.drain`` per log partition."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.errors import NotFoundError

from tally.bootstrap import CacheDroppingRecounter
from tally.core.model import CountKey
from tally.store.jetstream.eventlog import EventLog
from tally.store.postgres.cluster import PgCluster
from tally.store.postgres.counts import PostgresCountStore
from tally.store.postgres.likes import PostgresLikeStore
from tally.store.postgres.reconcile import PostgresRecounter
from tally.store.rediscache.counts import RedisCounts, TieredCounts
from tally.store.shards import ShardMap
from tally.workers.partitions import PartitionWorker
from tally.workers.relay import GroupRelay
from tests.store.harness import Harness

PARTITIONS = 2


async def _delete_stream(url: str, name: str) -> None:
    nc = await nats.connect(url)
    try:
        with contextlib.suppress(NotFoundError):
            await nc.jetstream().delete_stream(name)
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def make_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    dsns: list[str] = request.getfixturevalue("pg_shared_dsns")
    redis_url: str = request.getfixturevalue("redis_url")
    nats_url: str = request.getfixturevalue("nats_engine").url
    shard_map = ShardMap.build(64, len(dsns))
    box: dict[str, Any] = {}

    async def open_() -> None:
        cluster = PgCluster(dsns, shard_map, pool_max=8)
        box["cluster"] = cluster
        box["likes"] = PostgresLikeStore(cluster, outbox_slots=2)
        box["durable"] = PostgresCountStore(cluster)
        box["redis"] = RedisCounts(redis_url)
        box["counts"] = TieredCounts(box["redis"], box["durable"])
        box["recounter"] = CacheDroppingRecounter(
            PostgresRecounter(cluster, box["durable"], settle_s=0.05), box["redis"])
        box["log"] = EventLog(nats_url, "CONTRACT", PARTITIONS)
        await box["likes"].start()
        await box["durable"].start()
        await box["counts"].start()
        await box["log"].start()

    async def close() -> None:
        await box["log"].close()
        await box["counts"].close()
        await box["durable"].close()
        await box["likes"].close()

    async def pump() -> int:
        likes: PostgresLikeStore = box["likes"]
        for source in likes.sources():
            relay = GroupRelay([source], likes, box["log"])
            while await relay.step():
                pass
        total = 0
        for p in range(PARTITIONS):
            worker = PartitionWorker(p, box["log"], box["durable"], box["redis"], 0.0, ("day", "region"))
            total += await worker.drain()
        return total

    async def reopen() -> None:
        await close()
        await open_()

    async def corrupt(key: CountKey, value: int) -> None:
        async with box["cluster"].connection(shard_map.db_of(key[1])) as conn:
            await conn.execute("INSERT INTO counts VALUES ($1, $2, $3) ON CONFLICT (item, counter) "
                               "DO UPDATE SET count = excluded.count", key[1], key[0], value)
        await box["redis"].delete([key])

    def port(name: str) -> Any:
        return box["likes" if name == "outbox" else name]

    await _delete_stream(nats_url, "CONTRACT")  # the log starts empty, like the databases
    await open_()
    try:
        yield Harness("cluster", port, pump, reopen, corrupt,
                      extra={"dsns": dsns, "shard_map": shard_map, "box": box})
    finally:
        await close()
