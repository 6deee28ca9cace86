"""The cluster runtime: the same service on PostgreSQL shards, a JetStream log and Redis, by role.

``settings.role`` picks what a process runs; ``all`` runs every part in one process:

- api: the HTTP API. Writes go to the PostgreSQL like store (toggle + outbox row, one
  transaction); reads go in-process cache (hot keys only) -> Redis -> PostgreSQL counts.
- relay: publishes the outboxes to the event log (leases per outbox source).
- aggregator: applies log partitions to the PostgreSQL counts, then Redis (leases per partition).

Every role serves /healthz, /readyz (with its own checks and lag) and /metrics.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from tally.core.breaker import Breaker
from tally.core.hotkeys import SpaceSaving
from tally.core.lru import LRU
from tally.core.model import CountKey
from tally.metrics import Metrics, Sample
from tally.service.counters import CounterService, Limits
from tally.service.reads import CountReader
from tally.settings import Settings
from tally.store.jetstream.eventlog import EventLog
from tally.store.ports import ReconcileChunk, Recounter
from tally.store.postgres.build import build_postgres
from tally.store.rediscache.counts import RedisCounts, TieredCounts
from tally.workers.partitions import PartitionPool
from tally.workers.relay import Relay

log = logging.getLogger("tally")

ROLES = ("api", "relay", "aggregator")


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


class ClusterRuntime:
    """Builds only the parts of the process's role; each part starts and stops with the runtime."""

    def __init__(self, settings: Settings) -> None:
        from tally.bootstrap import schema_of

        self.settings = s = settings
        self.roles = set(ROLES) if s.role == "all" else {s.role}
        self.metrics = Metrics()
        self.hot = SpaceSaving(s.hot_top_k)
        self.pg = build_postgres(s)
        self.likes = self.pg.likes  # the like store and the outboxes
        self.counts = self.pg.counts
        self.events: EventLog | None = None
        self.redis: RedisCounts | None = None
        self.tiered: TieredCounts | None = None
        self._service: CounterService | None = None
        self.relay: Relay | None = None
        self.pool: PartitionPool | None = None
        if self.roles & {"relay", "aggregator"}:
            self.events = EventLog(s.nats_url, s.nats_stream, s.log_partitions,
                                   max_age_s=s.log_max_age_s)
        if self.roles & {"api", "aggregator"}:
            self.redis = RedisCounts(s.redis_url, s.redis_cluster, s.redis_ttl_s,
                                     s.redis_timeout_ms / 1000)
        lease_period_s = s.lease_period_ms / 1000
        if "api" in self.roles and self.redis is not None:
            self.tiered = TieredCounts(self.redis, self.counts, Breaker(threshold=1, cooldown_s=2.0))
            cache: LRU[CountKey, int] = LRU(s.cache_size, s.cache_ttl_s)
            reader = CountReader(self.tiered, cache, self.hot, cache_all=False,
                                 hot_ttl_s=s.hot_ttl_s, sample=s.hot_sample)
            self._service = CounterService(
                schema_of(s), self.likes, self.counts, reader, self._recounter(), s.region,
                Limits(s.max_batch_items, s.max_bulk_ops))
        if "relay" in self.roles and self.events is not None:
            self.relay = Relay(s.postgres_dsns[0], self.likes, self.events, s.relay_batch,
                               lease_period_s)
        if "aggregator" in self.roles and self.events is not None:
            self.pool = PartitionPool(s.postgres_dsns[0], self.events, self.counts, self.redis,
                                      s.aggregate_window_ms / 1000, s.rollups, lease_period_s)
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics.add_state(self.state)

    def _recounter(self) -> Recounter:
        recounter = self.pg.recounter
        return CacheDroppingRecounter(recounter, self.redis) if self.redis is not None else recounter

    @property
    def service(self) -> CounterService | None:
        return self._service

    async def start(self) -> None:
        await self.likes.start()
        await self.counts.start()
        if self.events is not None:
            await self.events.start()
        if self.redis is not None:
            await self.redis.start()
        if self.relay is not None:
            self.relay.start()
        if self.pool is not None:
            self.pool.start()
        if "api" in self.roles:
            self._every(60.0, self.likes.purge_idempotency)
            self._every(10.0, self._decay_hot)
        log.info("tally started", extra={"backend": "cluster", "roles": sorted(self.roles),
                                         "databases": len(self.settings.postgres_dsns),
                                         "partitions": self.settings.log_partitions})

    async def stop(self) -> None:
        from tally.bootstrap import cancel_all

        await cancel_all(self._tasks)
        if self.pool is not None:
            await self.pool.stop()
        if self.relay is not None:
            await self.relay.stop()
        if self.tiered is not None:
            await self.tiered.close()
        elif self.redis is not None:
            await self.redis.close()
        if self.events is not None:
            await self.events.close()
        await self.counts.close()
        await self.likes.close()
        log.info("tally stopped")

    async def _decay_hot(self) -> None:
        self.hot.decay()

    def _every(self, period_s: float, job: Callable[[], Awaitable[object]]) -> None:
        from tally.bootstrap import periodic

        self._tasks.append(periodic(period_s, job))

    async def readiness(self) -> tuple[bool, dict[str, object]]:
        """Ready when this role's required engines answer; Redis is optional (reads fall back)."""
        detail: dict[str, object] = {"roles": sorted(self.roles)}
        try:
            await asyncio.wait_for(self.counts.watermarks("readiness"), 5)
        except Exception as exc:
            return False, {**detail, "reason": f"postgres: {exc!r}"}
        if self.tiered is not None:
            detail["redis"] = "bypassed" if self.tiered.breaker.is_open else "ok"
        if self.relay is not None:
            rows, age = self.relay.lag()
            detail.update(sources=sorted(self.relay.sources), outbox_backlog=rows,
                          outbox_lag_seconds=age)
            if self.relay.leases.stats.members == 0:
                return False, {**detail, "reason": "relay leases not yet balanced"}
        if self.pool is not None:
            msgs, age = self.pool.lag()
            detail.update(partitions=sorted(self.pool.workers), log_pending_messages=msgs,
                          log_lag_seconds=age, reading_since={
                              str(n): w.stats.reading_at for n, w in self.pool.workers.items()},
                          first_applied_at={
                              str(n): w.stats.first_apply_at for n, w in self.pool.workers.items()})
            if self.pool.leases.stats.members == 0:
                return False, {**detail, "reason": "aggregator leases not yet balanced"}
        return True, detail

    def state(self) -> list[Sample]:
        """Gauges read at scrape time, for the parts this role runs."""
        rows: list[Sample] = []
        if self.tiered is not None:
            t = self.tiered
            rows += [("counter", "tally_redis_hits", "Count reads answered by Redis", t.hits, {}),
                     ("counter", "tally_redis_misses", "Count reads Redis did not have", t.misses,
                      {}),
                     ("counter", "tally_redis_fallbacks", "Batches read without Redis",
                      t.fallbacks, {}),
                     ("gauge", "tally_redis_bypassed", "1 while the Redis breaker is open",
                      float(t.breaker.is_open), {})]
        if self.relay is not None:
            for name, src in self.relay.sources.items():
                rows += [("counter", "tally_relay_published", "Outbox events published",
                          src.stats.published, {"source": name}),
                         ("counter", "tally_relay_failures", "Failed relay rounds",
                          src.stats.failures, {"source": name}),
                         ("gauge", "tally_relay_lag_seconds", "Age of the oldest unpublished row",
                          src.stats.lag_seconds, {"source": name})]
        if self.pool is not None:
            for n, w in self.pool.workers.items():
                labels = {"partition": str(n)}
                rows += [("counter", "tally_partition_events", "Events applied", w.stats.events,
                          labels),
                         ("counter", "tally_partition_skipped", "Redelivered events skipped",
                          w.stats.skipped, labels),
                         ("counter", "tally_partition_fenced", "Applies refused by the fence",
                          w.stats.fenced, labels),
                         ("gauge", "tally_partition_pending_messages", "Log messages unapplied",
                          float(w.stats.pending_msgs), labels),
                         ("gauge", "tally_partition_lag_seconds", "Age of the oldest unapplied",
                          w.stats.lag_seconds, labels)]
        return rows


def build_cluster(settings: Settings) -> ClusterRuntime:
    return ClusterRuntime(settings)
