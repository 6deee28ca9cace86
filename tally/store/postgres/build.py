"""The PostgreSQL roles built from plain configuration, sharing one set of pools."""

from __future__ import annotations

from dataclasses import dataclass, field

from tally.store.postgres.cluster import PgCluster
from tally.store.postgres.counts import PostgresCountStore
from tally.store.postgres.likes import PostgresLikeStore
from tally.store.postgres.reconcile import PostgresRecounter
from tally.store.shards import ShardMap


@dataclass(frozen=True)
class PostgresConfig:
    """What the PostgreSQL backend needs (the composition root fills it from the settings)."""

    dsns: list[str]
    logical_shards: int
    shard_map: list[str] = field(default_factory=list)  # 'FIRST-LAST=DB_INDEX' ranges
    pool_max: int = 10
    synchronous_commit: str = "on"
    outbox_slots: int = 4
    reconcile_settle_s: float = 2.0
    failover_s: float = 30.0  # how long a lost primary is retried (a failover's promotion)
    region: str = ""  # with regions: outbox sources are named after it
    application_name: str = "tally"  # shown in pg_stat_activity: which role a backend serves


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


def build_postgres(config: PostgresConfig) -> PostgresStores:
    shard_map = ShardMap.build(config.logical_shards, len(config.dsns), config.shard_map)
    cluster = PgCluster(config.dsns, shard_map, config.pool_max, config.synchronous_commit,
                        failover_s=config.failover_s, application_name=config.application_name)
    counts = PostgresCountStore(cluster)
    likes = PostgresLikeStore(cluster, config.outbox_slots, config.region)
    return PostgresStores(cluster, likes, counts,
                          PostgresRecounter(cluster, counts, config.reconcile_settle_s))
