"""The PostgreSQL roles built from settings, sharing one set of pools: what bootstrap wires."""

from __future__ import annotations

from dataclasses import dataclass

from tally.settings import Settings
from tally.store.postgres.cluster import PgCluster
from tally.store.postgres.counts import PostgresCountStore
from tally.store.postgres.likes import PostgresLikeStore
from tally.store.postgres.reconcile import PostgresRecounter
from tally.store.shards import ShardMap


@dataclass
class PostgresStores:
    cluster: PgCluster
    likes: PostgresLikeStore  # LikeStore and Outbox
    counts: PostgresCountStore
    recounter: PostgresRecounter

    async def start(self) -> None:
        await self.cluster.start()

    async def close(self) -> None:
        await self.cluster.close()


def build_postgres(settings: Settings) -> PostgresStores:
    shard_map = ShardMap.build(settings.logical_shards, len(settings.postgres_dsns),
                               settings.shard_map)
    cluster = PgCluster(settings.postgres_dsns, shard_map, settings.postgres_pool_max,
                        settings.postgres_synchronous_commit)
    counts = PostgresCountStore(cluster)
    return PostgresStores(cluster, PostgresLikeStore(cluster, settings.outbox_slots), counts,
                          PostgresRecounter(cluster, counts, settings.reconcile_settle_s))
