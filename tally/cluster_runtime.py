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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tally.core.hotkeys import SpaceSaving
from tally.metrics import Metrics, Sample
from tally.runtime import cancel_all, periodic
from tally.service.counters import CounterService
from tally.service.regions import RegionRouter
from tally.settings import Settings
from tally.store.jetstream.eventlog import EventLog
from tally.store.postgres.counts import PostgresCountStore
from tally.store.postgres.likes import PostgresLikeStore
from tally.store.rediscache.buckets import RedisBuckets
from tally.store.rediscache.counts import RedisCounts, TieredCounts
from tally.workers.failover import FailoverAgent
from tally.workers.partitions import PartitionPool
from tally.workers.relay import Relay

log = logging.getLogger("tally")

ROLES = ("api", "relay", "aggregator")
# How often an API re-reads the placement map: a failover's new epoch takes effect within it.
PLACEMENT_POLL_S = 0.5


@dataclass
class ClusterRuntime:
    """The parts of the process's role (built by ``tally.bootstrap.build_cluster``; absent parts
    are None); each part starts and stops with the runtime."""

    settings: Settings
    roles: set[str]
    metrics: Metrics
    hot: SpaceSaving
    likes: PostgresLikeStore  # the like store and the outboxes
    counts: PostgresCountStore
    events: EventLog | None = None
    redis: RedisCounts | None = None
    rate_buckets: RedisBuckets | None = None  # the API's rate limits, shared (tally.api.limits)
    tiered: TieredCounts | None = None
    service: CounterService | None = None  # None in roles that serve no API
    relay: Relay | None = None
    pool: PartitionPool | None = None
    router: RegionRouter | None = None  # with regions, in the api role
    failover: FailoverAgent | None = None  # with a witness quorum, in the api role
    region_sources: dict[str, dict[str, Any]] = field(default_factory=dict)  # peer -> its lag
    region_held: dict[str, int] = field(default_factory=dict)  # origin -> messages held here
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        await self.likes.start()
        await self.counts.start()
        if self.events is not None:
            await self.events.start()
        if self.redis is not None:
            await self.redis.start()
        if self.router is not None:
            await self.router.start()
            self._every(PLACEMENT_POLL_S, self.router.refresh)
        if self.failover is not None:
            await self.failover.witness.start()
            await self.failover.tick()  # logs and carries on when the quorum is not there yet
            self._every(self.settings.region_witness_ttl_s / 5, self.failover.tick)
        if self.events is not None and self.settings.region_name:
            self._every(1.0, self._poll_sources)
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

    @property
    def process(self) -> str:
        """Its roles, for its logs: ``api``, ``relay``, ``aggregator``, or several joined."""
        return "+".join(sorted(self.roles))

    async def stop(self) -> None:
        await cancel_all(self._tasks)
        if self.pool is not None:
            await self.pool.stop()
        if self.relay is not None:
            await self.relay.stop()
        if self.failover is not None:
            await self.failover.witness.close()  # revokes the lease: no wait for its expiry
        if self.router is not None:
            await self.router.close()
        if self.tiered is not None:
            await self.tiered.close()
        elif self.redis is not None:
            await self.redis.close()
        if self.events is not None:
            await self.events.close()
        await self.counts.close()
        await self.likes.close()
        log.info("tally stopped")

    async def _poll_sources(self) -> None:
        if self.events is not None:
            self.region_sources = await self.events.sources()
            self.region_held = await self.events.held()

    async def _decay_hot(self) -> None:
        self.hot.decay()

    def _every(self, period_s: float, job: Callable[[], Awaitable[object]]) -> None:
        self._tasks.append(periodic(period_s, job))

    async def readiness(self) -> tuple[bool, dict[str, object]]:
        """Ready when this role's required engines answer; Redis is optional (reads fall back)."""
        detail: dict[str, object] = {"roles": sorted(self.roles),
                                     "shard_map_epoch": self.likes.cluster.epoch}
        try:
            await asyncio.wait_for(self.counts.watermarks("readiness"), 5)
        except Exception as exc:
            return False, {**detail, "reason": f"postgres: {exc!r}"}
        if self.settings.region_name:
            detail["region"] = self.settings.region_name
            detail["region_sources"] = self.region_sources
            detail["region_held"] = self.region_held
        if self.router is not None:
            detail.update(placement_epoch=self.router.placement.epoch,
                          forwarded_ops=self.router.forwarded)
        if self.failover is not None:
            detail.update(witness_may_decide=self.failover.may_decide(),
                          witness_lease_left_s=round(self.failover.lease_left_s(), 2),
                          auto_failovers=self.failover.failovers)
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
        pg = self.likes.cluster
        rows: list[Sample] = [
            ("gauge", "tally_shard_map_epoch", "Epoch of the PostgreSQL shard map in force "
             "(tally shards move raises it)", float(pg.epoch), {}),
            ("counter", "tally_shard_fenced_writes", "Writes refused (503) by the guard of a "
             "logical shard being moved", pg.fenced, {}),
            ("counter", "tally_shard_map_reloads", "Shard map epochs adopted", pg.map_reloads, {}),
            ("counter", "tally_shard_map_poll_failures", "Failed reads of the shard map's epoch",
             pg.map_poll_failures, {}),
            ("counter", "tally_counts_fence_waits", "Count batches that waited for a shard "
             "move's count fence", self.counts.fenced_waits, {})]
        if "api" in self.roles and self.likes.group is not None:
            group = self.likes.group
            rows += [("counter", "tally_group_commit_batches", "Transactions that carried "
                      "concurrent single likes together (group commit)", group.batches, {}),
                     ("counter", "tally_group_commit_ops", "Single likes written by group "
                      "commit (over the batches: likes per transaction)", group.ops, {})]
        if self.tiered is not None:
            t = self.tiered
            rows += [("counter", "tally_redis_hits", "Count reads answered by Redis", t.hits, {}),
                     ("counter", "tally_redis_misses", "Count reads Redis did not have", t.misses,
                      {}),
                     ("counter", "tally_redis_fallbacks", "Batches read without Redis",
                      t.fallbacks, {}),
                     ("gauge", "tally_redis_bypassed", "1 while the Redis breaker is open",
                      float(t.breaker.is_open), {})]
        for peer, peer_lag in self.region_sources.items():
            rows += [("gauge", "tally_region_source_lag_messages", "Messages of a peer region's "
                      "log not yet sourced into this region's", float(peer_lag["lag"]),
                      {"peer": peer}),
                     ("gauge", "tally_region_source_idle_seconds", "Seconds since a peer region's "
                      "log last delivered (grows during a partition)",
                      float(peer_lag["active_s"]), {"peer": peer})]
        for origin, held in self.region_held.items():
            rows.append(("gauge", "tally_region_log_messages", "Messages this region's log holds "
                         "per origin region (compare with the origin's own figure)", float(held),
                         {"origin": origin}))
        if self.router is not None:
            rows += [("gauge", "tally_region_placement_epoch", "Epoch of the placement in force",
                      float(self.router.placement.epoch), {}),
                     ("counter", "tally_region_forwarded_ops", "Writes forwarded to their home "
                      "region", self.router.forwarded, {}),
                     ("counter", "tally_region_forward_seconds", "Time spent forwarding",
                      self.router.forward_seconds, {}),
                     ("counter", "tally_region_sync_held_ops", "Synchronous toggles a peer "
                      "region's log held before they were acknowledged", self.router.held_ops, {}),
                     ("counter", "tally_region_sync_refused_ops", "Synchronous toggles refused "
                      "(503) because no peer region's log held them in time",
                      self.router.hold_refusals, {}),
                     ("counter", "tally_region_sync_alone_ops", "Synchronous toggles acknowledged "
                      "without a peer because every peer region was failed over (at risk like "
                      "async ones until a peer rejoins)", self.router.held_alone, {}),
                     ("counter", "tally_region_fenced_ops", "Toggles refused while the region "
                      "could not renew its witness lease", self.router.fenced_ops, {})]
        if self.failover is not None:
            f = self.failover
            rows += [("gauge", "tally_region_witness_lease_seconds", "Seconds this process may "
                      "still decide for its region's users (0: fenced)", f.lease_left_s(), {}),
                     ("counter", "tally_region_auto_failovers", "Failovers this process decided "
                      "in the witness quorum", f.failovers, {}),
                     ("counter", "tally_region_witness_renew_failures", "Lease renewals that "
                      "did not reach the quorum", f.renew_failures, {})]
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
                          w.stats.lag_seconds, labels),
                         ("counter", "tally_partition_cache_losses", "Times the count cache "
                          "was found to have lost acknowledged puts (a restart)",
                          w.stats.cache_losses, labels),
                         ("counter", "tally_partition_cache_reputs", "Counts re-put into the "
                          "count cache from the count store after a loss",
                          w.stats.cache_reputs, labels)]
        return rows

