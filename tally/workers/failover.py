"""Automatic failover of a region, decided in a witness quorum (etcd), never by an election of
our own.

Every API process of every region runs a ``FailoverAgent``. Each ``tick`` (``ttl / 5``):

1. renews its lease in the quorum. Success proves this process is on the majority's side; the
   lease then lasts at least ``ttl`` from before the request was sent, so the process may decide
   for its region's users until ``SAFE_SHARE`` of that (``may_decide``): it stops *before* etcd
   can expire the lease, and so before anyone can fail its region over. A process cut off from
   the majority cannot renew and fences itself: its users' toggles fail with 503;
2. makes the quorum's placement and this region's stored one agree (the higher epoch wins: an
   operator's ``tally region failover`` is published, a failover decided elsewhere adopted);
   a process whose lease had expired decides nothing before it has adopted the quorum's map;
3. if a region that once held a lease holds none now, fails it over to this region: the same
   new epoch as ``tally region failover``, stored by a transaction on the placement key's
   revision (exactly one decider wins), then in this region, and the failed region's source
   removed from this region's stream (the rejoin decides what it held back).

Every region adopts a new epoch from the quorum, and removes from its stream the source of a
region the epoch newly moved. With two regions and no third member there is no majority once
the link is cut: nothing is decided automatically (``docs/regions.md``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from tally.core.errors import Unavailable
from tally.core.regions import Placement, newest
from tally.store.ports import RegionStore, Witness

log = logging.getLogger("tally.failover")

# The share of a renewed lease a process may use: etcd may expire the lease only after all of
# it, so the rest (2 s of a 10 s lease) covers a write in flight when the share runs out.
SAFE_SHARE = 0.8

SetSources = Callable[[Sequence[str]], Awaitable[None]]
Sources = Callable[[], Awaitable[Sequence[str]]]


class FailoverAgent:
    def __init__(self, region: str, witness: Witness, store: RegionStore,
                 initial: Placement, on_placement: Callable[[Placement], None],
                 sources: Sources | None = None, set_sources: SetSources | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``on_placement``: hands a newly adopted map to the router at once (before this
        process may decide again); ``sources``/``set_sources``: this region's stream's sourced
        peers (None in a process without the log: another process of the region fences)."""
        self.region = region
        self.witness = witness
        self.store = store
        self.placement = initial
        self.on_placement = on_placement
        self.sources = sources
        self.set_sources = set_sources
        self.clock = clock
        self.valid_until = 0.0  # clock() before which this process may decide
        self.failovers = 0  # decided by this process
        self.renew_failures = 0

    def may_decide(self) -> bool:
        return self.clock() < self.valid_until

    def lease_left_s(self) -> float:
        return max(self.valid_until - self.clock(), 0.0)

    async def tick(self) -> None:
        sent = self.clock()
        try:
            ttl = await self.witness.keepalive()
            await self._agree()
        except Unavailable as exc:
            self.renew_failures += 1
            log.warning("witness quorum unreachable", extra={
                "region": self.region, "may_decide_s": round(self.lease_left_s(), 2),
                "error": str(exc)})
            return
        self.valid_until = sent + SAFE_SHARE * ttl
        try:
            await self._fail_over_the_silent()
        except Unavailable as exc:
            log.warning("failover check failed", extra={"region": self.region,
                                                        "error": str(exc)})

    async def _agree(self) -> None:
        """Quorum's placement vs this region's: publish the newer, or adopt it."""
        held, revision = await self.witness.placement()
        local = newest(self.placement, await self.store.placement()) or self.placement
        if held is None or local.epoch > held.epoch:
            await self._adopt(local)
            await self.witness.swap_placement(local, revision)  # lost a race: next tick agrees
        else:
            await self._adopt(held)

    async def _adopt(self, placement: Placement) -> None:
        before = self.placement
        if placement.epoch < before.epoch:
            return
        self.placement = placement
        self.on_placement(placement)  # the router first: it decides by it from now on
        if placement.epoch > before.epoch:
            await self.store.put_placement(placement)
        newly = [r for r in placement.moved if r not in before.moved and r != self.region]
        if newly and self.region not in placement.moved:
            await self._fence_out(newly)

    async def _fence_out(self, failed: Sequence[str]) -> None:
        if self.sources is None or self.set_sources is None:
            return
        keep = [p for p in await self.sources() if p not in failed]
        await self.set_sources(keep)
        log.warning("failed regions fenced out of this region's stream",
                    extra={"region": self.region, "failed": sorted(failed)})

    async def _fail_over_the_silent(self) -> None:
        placement = self.placement
        if self.region in placement.moved:
            return  # this region serves nobody: it takes nobody over
        alive, members = await self.witness.alive(), await self.witness.members()
        for peer in placement.serving():
            if peer == self.region or peer not in members or peer in alive:
                continue
            held, revision = await self.witness.placement()
            if held is None or held.epoch != placement.epoch:
                return  # moved on meanwhile: the next tick adopts it first
            nxt = placement.failover(peer, self.region, time.time())
            if not await self.witness.swap_placement(nxt, revision):
                return  # another survivor decided first
            self.failovers += 1
            log.warning("automatic failover", extra={
                "region": self.region, "failed": peer, "epoch": nxt.epoch})
            await self._adopt(nxt)
            return
