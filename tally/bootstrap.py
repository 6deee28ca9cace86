"""The composition root: the one place that wires settings, stores, the service and the workers
together, for the embedded runtime (SQLite, defined here) and for each cluster role
(``tally.cluster_runtime``). Only this module names a backend."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tally import regions_admin
from tally.cluster_runtime import ROLES, ClusterRuntime
from tally.core.breaker import Breaker
from tally.core.errors import ConfigError
from tally.core.hotkeys import SpaceSaving
from tally.core.lru import LRU
from tally.core.model import CountKey
from tally.core.regions import Placement
from tally.metrics import Metrics, Sample
from tally.runtime import AppRuntime, cancel_all, periodic, postgres_config, schema_of
from tally.service.counters import CounterService, Limits
from tally.service.reads import HOT_SAMPLE, REPORT_SAMPLE, CountReader
from tally.service.regions import RegionRouter
from tally.settings import Settings, region_peers
from tally.store.etcd.witness import EtcdWitness
from tally.store.jetstream.eventlog import EventLog
from tally.store.jetstream.synchold import JetStreamHold
from tally.store.peers.forward import HttpRemoteWriter
from tally.store.ports import ReconcileChunk, Recounter
from tally.store.postgres.build import build_postgres
from tally.store.postgres.leases import PgLeases
from tally.store.postgres.regions import PostgresRegions
from tally.store.rediscache.buckets import RedisBuckets
from tally.store.rediscache.counts import RedisCounts, TieredCounts
from tally.store.sqlite.store import SqliteStore
from tally.workers.aggregator import Aggregator
from tally.workers.failover import FailoverAgent
from tally.workers.partitions import PartitionPool, RemoteRecords
from tally.workers.relay import Relay

log = logging.getLogger("tally")


@dataclass
class Runtime:
    settings: Settings
    store: SqliteStore
    service: CounterService
    aggregator: Aggregator
    metrics: Metrics
    hot: SpaceSaving
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        await self.store.start()
        self.aggregator.start()
        self._every(60.0, self.store.purge_idempotency)
        self._every(1.0, self.aggregator.refresh_lag)
        self._every(10.0, self._decay_hot)
        log.info("tally started", extra={"backend": "sqlite", "db": str(self.store.path),
                                         "synchronous": self.store.synchronous})

    async def stop(self) -> None:
        await cancel_all(self._tasks)
        await self.aggregator.stop()
        await self.store.close()
        log.info("tally stopped")

    @property
    def process(self) -> str:
        """The first (or only) API process: it also runs the counts writer's aggregation rounds
        and the checkpoints, in threads that share its interpreter lock."""
        return "api-first"

    async def readiness(self) -> tuple[bool, dict[str, object]]:
        try:
            await self.store.watermarks(self.aggregator.consumer)
        except Exception as exc:
            return False, {"reason": str(exc)}
        down = [k for k, proc in enumerate(self.store.writer_processes) if not proc.running]
        if down:
            return False, {"reason": f"likes writer process of shard(s) {down} is restarting"}
        if self.store.syncs_wal_itself and self.store.sync_stats()[1]:
            return False, {"reason": "a likes writer stopped after a failed WAL fsync: writes "
                                     "are refused until the server restarts"}
        lag = self.aggregator.stats
        return True, {"aggregator_lag_events": max(lag.head - lag.watermark, 0),
                      "aggregator_lag_seconds": lag.lag_seconds}

    async def _decay_hot(self) -> None:
        self.hot.decay()

    def _every(self, period_s: float, job: Callable[[], Awaitable[object]]) -> None:
        self._tasks.append(periodic(period_s, job))

    def state(self) -> list[Sample]:
        """Gauges read at scrape time."""
        agg, cache = self.aggregator.stats, self.service.reader.cache
        commits, committed_ops, failed_commits = self.store.write_stats()
        lookups = cache.hits + cache.misses
        rows: list[Sample] = [
            ("gauge", "tally_aggregator_lag_events", "Change-log events not yet applied",
             float(max(agg.head - agg.watermark, 0)), {}),
            ("gauge", "tally_aggregator_lag_seconds", "Age of the oldest unapplied event",
             agg.lag_seconds, {}),
            ("counter", "tally_aggregator_events", "Events applied to counts", agg.events, {}),
            ("counter", "tally_aggregator_batches", "Aggregation transactions", agg.batches, {}),
            ("counter", "tally_aggregator_keys_written", "Count rows written", agg.keys_written,
             {}),
            ("gauge", "tally_cache_hit_ratio", "Count cache hits / lookups",
             cache.hits / lookups if lookups else 0.0, {}),
            ("gauge", "tally_cache_entries", "Counts held in the in-process cache",
             float(len(cache)), {}),
            ("counter", "tally_cache_coalesced_misses", "Misses served by another request's fetch",
             self.service.reader.coalesced, {}),
            ("counter", "tally_write_commits", "Group commits", commits, {}),
            ("counter", "tally_write_ops_committed", "Operations committed", committed_ops, {}),
            ("counter", "tally_write_commit_failures", "Failed group commits",
             failed_commits, {}),
        ]
        if self.store.syncs_wal_itself:
            syncs, stopped = self.store.sync_stats()
            rows += [
                ("counter", "tally_write_syncs", "WAL syncs of the likes writers (one a "
                 "round: each answers every commit of its round)", float(syncs), {}),
                ("gauge", "tally_write_stopped_by_sync_failure", "Likes writers that take no "
                 "writes after a failed fsync (restart the server once the disk is checked)",
                 float(stopped), {}),
            ]
        for shard, proc in enumerate(self.store.writer_processes):
            rows.append(("counter", "tally_write_process_restarts",
                         "Times a likes writer process died and was started again",
                         float(proc.restarts), {"shard": str(shard)}))
        if (ckpt := self.store.checkpointer) is not None:
            rows.append(("counter", "tally_sqlite_checkpoints", "Background WAL checkpoints",
                         float(ckpt.checkpoints), {}))
            rows.append(("counter", "tally_sqlite_checkpoint_failures",
                         "Background WAL checkpoints that failed", float(ckpt.failures), {}))
            for name, frames in ckpt.wal_frames.items():
                rows.append(("gauge", "tally_sqlite_wal_frames", "WAL frames at the last "
                             "background checkpoint", float(frames), {"file": name}))
        for item, est, err in self.hot.top(10):
            rows.append(("gauge", "tally_hot_item_hits", "Heavy-hitter estimate per hot item",
                         float(est - err), {"item": item}))
        return rows


def build_for(settings: Settings) -> AppRuntime:
    """The runtime the settings ask for: embedded SQLite, or one cluster role."""
    if settings.backend == "cluster":
        return build_cluster(settings)
    return build(settings)


def build(settings: Settings, writers_dir: Path | None = None) -> Runtime:
    """The embedded runtime of one API process, or of the first of several (``writers_dir``:
    where its likes writers listen for the others, see ``build_api_process``)."""
    store = SqliteStore(settings.sqlite_path, synchronous=settings.sqlite_synchronous,
                        likes_shards=settings.sqlite_likes_shards, log_level=settings.log_level,
                        writers_dir=writers_dir)
    hot = SpaceSaving()
    cache: LRU[CountKey, int] = LRU(settings.cache_size, settings.cache_ttl_s)
    reader = CountReader(store, cache, hot, cache_all=True, hot_ttl_s=settings.hot_ttl_s,
                         sample=REPORT_SAMPLE)
    aggregator = Aggregator(store, store, window_s=settings.aggregate_window_ms / 1000,
                            rollups=settings.rollups,
                            on_applied=reader.applied, in_place=store)
    service = CounterService(schema_of(settings), store, store, reader, store, settings.region,
                             Limits(settings.max_batch_items, settings.max_bulk_ops),
                             on_write=aggregator.notify)
    metrics = Metrics()
    runtime = Runtime(settings, store, service, aggregator, metrics, hot)
    metrics.add_state(runtime.state)
    return runtime


@dataclass
class ApiProcessRuntime:
    """One of the other API processes of ``tally serve --workers N`` on SQLite: writes go to the
    first process's likes writers over their sockets, reads straight to the files. No aggregator
    or checkpoints here (the first process runs them), so no count cache written through by an
    aggregator either: a count is read from the count table, as fresh as the first process's
    cache, and only hot items are held for ``hot_ttl_s``, as in the cluster."""

    settings: Settings
    store: SqliteStore
    service: CounterService
    metrics: Metrics
    hot: SpaceSaving

    async def start(self) -> None:
        await self.store.start()
        log.info("tally API process started", extra={"backend": "sqlite",
                                                     "db": str(self.store.path)})

    async def stop(self) -> None:
        await self.store.close()

    @property
    def process(self) -> str:
        return "api"

    async def readiness(self) -> tuple[bool, dict[str, object]]:
        try:
            head, applied, _oldest = await self.store.lag("aggregator")
        except Exception as exc:
            return False, {"reason": str(exc)}
        down = [k for k, proc in enumerate(self.store.writer_processes) if not proc.running]
        if down:
            return False, {"reason": f"likes writer process of shard(s) {down} is restarting"}
        return True, {"aggregator_lag_events": max(head - applied, 0)}

    def state(self) -> list[Sample]:
        cache = self.service.reader.cache
        lookups = cache.hits + cache.misses
        return [("gauge", "tally_cache_hit_ratio", "Count cache hits / lookups",
                 cache.hits / lookups if lookups else 0.0, {}),
                ("gauge", "tally_cache_entries", "Counts held in the in-process cache",
                 float(len(cache)), {})]


def build_api_process(settings: Settings, writers_dir: Path) -> ApiProcessRuntime:
    store = SqliteStore(settings.sqlite_path, synchronous=settings.sqlite_synchronous,
                        likes_shards=settings.sqlite_likes_shards, log_level=settings.log_level,
                        writers_dir=writers_dir, owner=False)
    hot = SpaceSaving()
    cache: LRU[CountKey, int] = LRU(settings.cache_size, settings.cache_ttl_s)
    reader = CountReader(store, cache, hot, cache_all=False, hot_ttl_s=settings.hot_ttl_s,
                         sample=HOT_SAMPLE)
    service = CounterService(schema_of(settings), store, store, reader, store, settings.region,
                             Limits(settings.max_batch_items, settings.max_bulk_ops))
    metrics = Metrics()
    runtime = ApiProcessRuntime(settings, store, service, metrics, hot)
    metrics.add_state(runtime.state)
    return runtime


def _region_key(s: Settings) -> str | None:
    if not s.region_key_file:
        return None
    try:
        return Path(s.region_key_file).read_text().strip() or None
    except OSError as exc:
        raise ConfigError(f"region_key_file {s.region_key_file}: {exc.strerror}") from exc


def _failover_agent(s: Settings, router: RegionRouter, regions: PostgresRegions
                    ) -> FailoverAgent:
    """Automatic failover through the witness quorum; the router decides only while it may.
    A failover decided in the quorum is completed here by the operator's own steps."""

    async def take_over(failed: str, placement: Placement) -> None:
        await regions_admin.complete_failover(s, failed, placement)

    agent = FailoverAgent(s.region_name, EtcdWitness(s.region_witness_urls, s.region_name,
                                                     s.region_witness_ttl_s),
                          regions, router.placement, router.adopt, take_over)
    router.may_decide = agent.may_decide
    return agent


class CacheDroppingRecounter:
    """A repair changes counts without a new log version: drop those keys from Redis too."""

    def __init__(self, inner: Recounter, redis: RedisCounts) -> None:
        self.inner = inner
        self.redis = redis

    async def reconcile_chunk(self, counters: Sequence[str], items: Sequence[str] | None,
                              after: tuple[str, str] | None, limit: int,
                              repair: bool) -> ReconcileChunk:
        chunk = await self.inner.reconcile_chunk(counters, items, after, limit, repair)
        if repair and chunk.drifts:
            await self.redis.delete([(d.counter, d.item) for d in chunk.drifts])
        return chunk


def build_cluster(settings: Settings) -> ClusterRuntime:
    """Only the parts of the process's role (``settings.role``; ``all`` runs every part)."""
    s = settings
    roles = set(ROLES) if s.role == "all" else {s.role}
    pg = build_postgres(postgres_config(s))
    rt = ClusterRuntime(s, roles, Metrics(), SpaceSaving(), pg.likes, pg.counts)
    regions = PostgresRegions(pg.cluster, schema_of(s).toggles)
    witness_api = "api" in roles and bool(s.region_name and s.region_witness_urls)
    if roles & {"relay", "aggregator"}:
        rt.events = EventLog(s.nats_url, s.nats_stream, s.log_partitions,
                             replicas=s.nats_replicas, max_age_s=s.log_max_age_s,
                             region=s.region_name, peers=list(region_peers(s)))
    if roles & {"api", "aggregator"}:
        rt.redis = RedisCounts(s.redis_url, s.redis_cluster, s.redis_ttl_s,
                               s.redis_timeout_ms / 1000)
        rt.rate_buckets = RedisBuckets(rt.redis)  # fair use shared by the API processes
    leases = PgLeases(s.postgres_dsns[0])  # the coordination database
    lease_period_s = s.lease_period_ms / 1000
    if "api" in roles and rt.redis is not None:
        rt.tiered = TieredCounts(rt.redis, pg.counts.for_serving(),
                                 Breaker(threshold=1, cooldown_s=2.0))
        cache: LRU[CountKey, int] = LRU(s.cache_size, s.cache_ttl_s)
        reader = CountReader(rt.tiered, cache, rt.hot, cache_all=False, hot_ttl_s=s.hot_ttl_s,
                             sample=HOT_SAMPLE)
        recounter = CacheDroppingRecounter(pg.recounter, rt.redis)
        if s.region_name:
            # Every region holds its peers' synchronous changes, whatever its own counters do.
            hold = JetStreamHold(s.nats_url, s.nats_stream, s.region_name, list(region_peers(s)),
                                 s.log_max_age_s, connect_in_background=True)
            rt.router = RegionRouter(
                s.region_name, pg.likes, regions, HttpRemoteWriter(region_peers(s), _region_key(s)),
                Placement.initial([s.region_name, *region_peers(s)]), hold, s.sync_counters,
                rt.metrics.sync_wait.observe)
            if witness_api:
                rt.failover = _failover_agent(s, rt.router, regions)
        rt.service = CounterService(schema_of(s), rt.router or pg.likes, pg.counts, reader,
                                    recounter,
                                    s.region, Limits(s.max_batch_items, s.max_bulk_ops))
    if "relay" in roles and rt.events is not None:
        # The relay's window is a fifth of the aggregator's: one budget for how late a count
        # may show a like, mostly spent where a round costs most (the counts' transaction).
        rt.relay = Relay(leases, pg.likes, rt.events, lease_period_s=lease_period_s,
                         window_s=s.aggregate_window_ms / 5000)
    if "aggregator" in roles and rt.events is not None:
        remote = RemoteRecords(regions, s.region_name) if s.region_name else None
        rt.pool = PartitionPool(leases, rt.events, pg.counts, rt.redis,
                                s.aggregate_window_ms / 1000, s.rollups, lease_period_s, remote)
    rt.metrics.add_state(rt.state)
    return rt
