"""Operator actions across regions: failover, rejoin, and the conflicts a rejoin listed.

Each runs against the settings of the regions it touches (their PostgreSQL and JetStream), from
any machine that reaches them, and composes the stores like ``tally.bootstrap``.

Failover (``failed`` -> ``to``), run for every surviving region: fence the failed region out of
the survivor's stream (its source removed), so nothing it acknowledged but never replicated can
slip in later uncontrolled; at ``to``, apply what the failed region's synchronous writes left in
the holding streams (``apply_held``); then store the next placement epoch (the failed region's
users now homed at ``to``; the APIs read it within ``PLACEMENT_POLL_S``).

Rejoin (``returning`` back, ``survivor`` took its users), once the returning region's engines and
relay run again and its outbox is drained into its own stream:
1. the returning region adopts the newest placement (its API forwards its old users' writes);
2. every change the returning region holds that the survivor never applied (above the survivor's
   aggregator watermarks for the returning region's sources) is decided by
   ``core.regions.rejoin_decision`` against the survivor's record: AGREE (nothing), APPLY (written
   at the survivor as its own decision, so it replicates everywhere like one), CONFLICT (listed,
   and the returning region's record set to the survivor's, the newer epoch's state);
3. the survivor's watermarks move past those changes, and its stream sources the returning
   region again: what arrives then is skipped, not counted a second time;
4. the returning region's own sources are restarted (JetStream's retry backoff after a long
   cut or a restart would hold them back for tens of seconds);
5. the caller repairs counts against a recount (``reconcile``), in the returning region first:
   it counted its own late changes, and receives the survivor's re-decisions of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from tally.core.coalesce import coalesce
from tally.core.model import CountKey, Event
from tally.core.regions import Placement, Rejoin, newest, rejoin_decision
from tally.runtime import postgres_config, schema_of
from tally.settings import Settings, region_peers
from tally.store.jetstream.eventlog import EventLog, partition_of
from tally.store.jetstream.synchold import JetStreamHold
from tally.store.ports import Conflict, HeldState, ToggleKey
from tally.store.postgres.build import PostgresStores, build_postgres
from tally.store.postgres.regions import PostgresRegions
from tally.store.rediscache.counts import RedisCounts

log = logging.getLogger("tally.regions")


@dataclass
class RejoinReport:
    late: int = 0  # the returning region's changes the survivor had not applied
    agreed: int = 0
    applied: int = 0
    conflicts: list[Conflict] = field(default_factory=list)


class RegionHandle:
    """One region's PostgreSQL and JetStream, opened from its settings."""

    def __init__(self, s: Settings) -> None:
        self.settings = s
        self.name = s.region_name
        self.pg: PostgresStores = build_postgres(postgres_config(s))
        self.regions = PostgresRegions(self.pg.cluster, schema_of(s).toggles)
        self.touched: set[CountKey] = set()  # counts changed here, to drop from the cache
        self.log = EventLog(s.nats_url, s.nats_stream, s.log_partitions, region=s.region_name,
                            peers=list(region_peers(s)))

    async def __aenter__(self) -> RegionHandle:
        await self.pg.start()
        try:
            await self.log.start()
        except BaseException:  # a region whose NATS is down (or still starting): no pool left
            await self.pg.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.log.close()
        await self.pg.close()

    def all_regions(self) -> list[str]:
        return [self.name, *region_peers(self.settings)]

    async def placement(self) -> Placement:
        initial = Placement.initial(self.all_regions())
        return newest(initial, await self.regions.placement()) or initial

    async def sourced(self) -> list[str]:
        info = await self.log.sources()
        return sorted(info)


async def failover(survivor: Settings, failed: str, to: str) -> Placement:
    async with RegionHandle(survivor) as h:
        current = await h.placement()
        nxt = current if current.moved.get(failed) == to else current.failover(
            failed, to, time.time())
        await _take_over(h, failed, nxt, nxt is not current)
        return nxt


async def complete_failover(survivor: Settings, failed: str, placement: Placement) -> None:
    """A failover decided elsewhere (in the witness quorum, ``tally.workers.failover``), done in
    this region by the same steps as ``failover``, with the map decided there."""
    async with RegionHandle(survivor) as h:
        await _take_over(h, failed, placement, (await h.placement()).epoch < placement.epoch)


async def _take_over(h: RegionHandle, failed: str, nxt: Placement, new: bool) -> None:
    to = nxt.moved[failed]
    await h.log.set_sources([p for p in await h.sourced() if p != failed])
    await _fence_held(h.settings, failed, True)
    if h.name == to and new:
        # The old epoch's replicated decisions first: one applied after a decision of the new
        # epoch on the same pair would be refused by its record (older) but counted.
        await _wait_applied(h, 60.0)
        # Before the new epoch: no decision of it may exist while the old one is completed.
        report = await apply_held(h, failed)
        log.info("failover applied the held synchronous states", extra={
            "failed": failed, "to": to, "held": report.held, "applied": report.applied,
            "agreed": report.agreed, "unread": report.unread})
    await h.regions.put_placement(nxt)


@dataclass
class HeldReport:
    held: int = 0  # (user, item) states the holding streams kept for the failed region
    agreed: int = 0  # the survivor's records had them already (replicated in time)
    applied: int = 0  # the survivor lacked them: written, and their counts changed
    unread: list[str] = field(default_factory=list)  # other survivors whose streams failed


async def apply_held(h: RegionHandle, failed: str, drain_timeout_s: float = 60.0
                     ) -> HeldReport:
    """Complete the survivor with every synchronous state ``failed`` acknowledged.

    Each such state is in a holding stream of some other region (``synchold``): this region's,
    or another survivor's (read across the leaf link). First the survivor's aggregators apply
    everything its stream holds (its source of ``failed`` is fenced already, so that is final);
    then per (user, item) the newest held state is compared with the survivor's record: the
    same state, or a record newer than it (a decision made after it), stands; otherwise the
    state is written, and its count changed (+1/-1) in a commit serialized with the partition's
    aggregator. Running it again changes nothing. No watermark moves: if ``failed`` rejoins with
    its disks, its late events meet records that agree already.
    """
    report = HeldReport()
    s = h.settings
    hold = _hold_of(s)
    await hold.start()
    try:
        states = await hold.held(failed)
        for peer in region_peers(s):
            if peer == failed:
                continue
            try:
                states += await hold.held(failed, domain=peer)
            except Exception as exc:
                log.warning("a survivor's holding stream could not be read", extra={
                    "peer": peer, "error": repr(exc)})
                report.unread.append(peer)
    finally:
        await hold.close()
    if not states:
        return report
    await _wait_applied(h, drain_timeout_s)
    latest: dict[ToggleKey, HeldState] = {}
    for st in states:
        key = (st.counter, st.user, st.item)
        if key not in latest or st.ts > latest[key].ts:
            latest[key] = st
    report.held = len(latest)
    records = await h.regions.records(list(latest))
    take: list[tuple[ToggleKey, bool, float]] = []
    events: dict[int, list[Event]] = {}
    for key, st in latest.items():
        rec_on, rec_ts = records.get(key, (None, None))
        if bool(rec_on) == st.on or (rec_ts is not None and rec_ts >= st.ts):
            report.agreed += 1  # held already, or a newer decision (after it) stands
            continue
        report.applied += 1
        take.append((key, st.on, st.ts))
        run = events.setdefault(partition_of(st.counter, st.item, s.log_partitions), [])
        # Numbered from 1 only for ``coalesce`` (it skips what is at or below a position).
        run.append(Event(len(run) + 1, st.counter, st.item, st.user, 1 if st.on else -1, st.ts,
                         failed, f"{failed}.held"))
    # Records first: a crash before the counts' commit leaves counts a recount repairs.
    await h.regions.force(take)
    for p, evs in sorted(events.items()):
        batch = coalesce(evs, s.rollups)
        batch.positions = {}  # additive, fenced by the consumer's lock, no watermark moved
        await h.pg.counts.apply_batch(batch, f"agg-p{p}", {})
        h.touched.update(batch.deltas)
    await _drop_cached(s, h.touched)
    return report


def _hold_of(s: Settings) -> JetStreamHold:
    return JetStreamHold(s.nats_url, s.nats_stream, s.region_name, list(region_peers(s)),
                         s.log_max_age_s)


async def _fence_held(s: Settings, origin: str, fenced: bool) -> None:
    hold = _hold_of(s)
    await hold.start()
    try:
        await hold.fence(origin, fenced)
    finally:
        await hold.close()


async def _wait_applied(h: RegionHandle, timeout_s: float) -> None:
    """Until the survivor's aggregators applied every message its stream held at the call."""
    target = await h.log.last_seqs()
    deadline = time.monotonic() + timeout_s
    while True:
        behind = {p: seq for p, seq in target.items()
                  if (await h.pg.counts.watermarks(f"agg-p{p}")).get(f"js:p{p}", 0) < seq}
        if not behind:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{h.name}: aggregators did not apply partitions {sorted(behind)} "
                               f"in {timeout_s:.0f} s; the failover stopped before its new epoch "
                               "(run it again once they do)")
        await asyncio.sleep(0.1)


async def placement_of(region: Settings) -> Placement:
    async with RegionHandle(region) as h:
        return await h.placement()


async def progress(region: Settings) -> tuple[dict[str, int], int]:
    """(messages the region's log holds per origin, outbox rows not yet in the log plus messages
    its aggregators have not applied), read from the engines themselves: what the processes
    report may be a second old."""
    async with RegionHandle(region) as h:
        held = await h.log.held()
        behind = 0
        for source in h.pg.likes.sources():
            behind += len(await h.pg.likes.pending(source, 0, 100))
        for p, last in (await h.log.last_seqs()).items():
            applied = (await h.pg.counts.watermarks(f"agg-p{p}")).get(f"js:p{p}", 0)
            behind += max(last - applied, 0)
        return held, behind


async def adopt_placement(region: Settings, placement: Placement) -> None:
    async with RegionHandle(region) as h:
        await h.regions.put_placement(placement)


async def rejoin(survivor: Settings, returning: Settings) -> RejoinReport:
    report = RejoinReport()
    async with RegionHandle(survivor) as sv, RegionHandle(returning) as rt:
        placement = await sv.placement()
        await rt.regions.put_placement(placement)
        for p in range(survivor.log_partitions):
            await _rejoin_partition(sv, rt, p, placement, report)
        await _drop_cached(survivor, sv.touched)
        await sv.log.set_sources(sorted({*await sv.sourced(), rt.name}))
        await _fence_held(survivor, rt.name, False)
        await restart_sources(rt)
    return report


async def restart_sources(h: RegionHandle) -> None:
    """Restart a region's sources now. JetStream retries a source that kept failing (the region
    was cut off or restarted before its peers were reachable) with a growing backoff, measured
    at about 30 s before it resumed; removed and added again, a source starts at once, after
    what the stream already holds of it."""
    peers = await h.sourced()
    if peers:
        await h.log.set_sources([])
        await h.log.set_sources(peers)


async def resume_sources(region: Settings) -> None:
    """``restart_sources`` from a region's settings: after a link every source crossed came
    back (the leaf-node hub restarted), so replication resumes now, not after the backoff."""
    async with RegionHandle(region) as h:
        await restart_sources(h)


async def _rejoin_partition(sv: RegionHandle, rt: RegionHandle, p: int, placement: Placement,
                            report: RejoinReport) -> None:
    """Step 2 and 3 for one partition: its late changes merged into the survivor's records and
    counts, and its watermarks moved past them, in one fenced commit (no new event is written,
    so the returning region receives nothing it has counted already)."""
    consumer, prefix = f"agg-p{p}", f"{rt.name}."
    marks = await sv.pg.counts.watermarks(consumer)
    late = [ev for ev in await rt.log.origin_events(rt.name, p)
            if ev.source.startswith(prefix) and ev.seq > marks.get(ev.source, 0)]
    if not late:
        return
    report.late += len(late)
    top: dict[str, int] = {}
    last: dict[ToggleKey, Event] = {}
    merged: list[Event] = []  # increments, and the toggles applied: their deltas are counted
    for ev in late:
        top[ev.source] = max(top.get(ev.source, 0), ev.seq)
        if ev.user is None or ev.counter not in sv.regions.toggles:
            merged.append(ev)  # a sum has no conflicts
        elif (key := (ev.counter, ev.user, ev.item)) not in last or ev.ts >= last[key].ts:
            last[key] = ev
    records = await sv.regions.records(list(last))
    take: list[tuple[ToggleKey, bool, float]] = []
    agreed: list[Event] = []
    forced: list[tuple[ToggleKey, bool, float]] = []
    for key, ev in last.items():
        on = ev.delta > 0
        rec_on, rec_ts = records.get(key, (None, None))
        verdict = rejoin_decision(on, ev.ts, rec_on, rec_ts, placement.since)
        if verdict is Rejoin.AGREE:
            report.agreed += 1
            agreed.append(ev)
        elif verdict is Rejoin.APPLY:
            take.append((key, on, ev.ts))
            merged.append(ev)  # its delta (+1 on, -1 off) is the record's change
            report.applied += 1
        else:
            report.conflicts.append(Conflict(ev.source, ev.seq, key[0], key[2], key[1], on,
                                             ev.ts, rec_on, rec_ts, placement.epoch))
            if rec_on is not None and rec_ts is not None:
                forced.append((key, rec_on, rec_ts))
    # Records first: a crash before the commit below leaves counts that a recount repairs.
    await sv.regions.force(take)
    # An agreed change is stamped too (newer-wins: the state stays, its time moves on). Once the
    # survivor sources the returning region again, an aggregator that has not yet seen this
    # commit's watermarks writes the late changes' records before its own commit is refused;
    # an older change of the same pair (a like before the late unlike, in an earlier window)
    # would otherwise win over a record the rejoin left untouched. Measured: a like record left
    # on at the survivor that the returning region and the client had unliked.
    await sv.regions.apply_remote(agreed)
    await sv.regions.add_conflicts(report.conflicts)
    await rt.regions.force(forced)
    merged.sort(key=lambda e: (e.source, e.seq))
    batch = coalesce(merged, sv.settings.rollups)
    batch.positions = {src: max(seq, marks.get(src, 0)) for src, seq in top.items()}
    if await sv.pg.counts.apply_batch(batch, consumer, marks) is None:
        raise RuntimeError(f"{consumer}: watermarks moved during the rejoin; the returning "
                           "region must be fenced out (failover) first. Run rejoin again.")
    sv.touched.update(batch.deltas)


async def _drop_cached(s: Settings, keys: set[CountKey]) -> None:
    """The survivor's Redis holds counts the rejoin changed without a new log version."""
    if not keys:
        return
    redis = RedisCounts(s.redis_url, s.redis_cluster, s.redis_ttl_s, s.redis_timeout_ms / 1000)
    await redis.start()
    try:
        await redis.delete(list(keys))
    finally:
        await redis.close()


async def source_again(region: Settings, peer: str) -> None:
    """After a rejoin, a region other than the survivor sources the returned ``peer`` again
    (three regions or more): its late changes arrive as replicated ones, records newer-wins, and
    the recount after the rejoin repairs what a conflict's loser added to the counts."""
    async with RegionHandle(region) as h:
        await h.log.set_sources(sorted({*await h.sourced(), peer}))


async def conflicts(region: Settings) -> list[Conflict]:
    async with RegionHandle(region) as h:
        return await h.regions.conflicts()
