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
   revision (exactly one decider wins), then completed here by the operator's own steps
   (``take_over``: the failed region fenced out of the stream, its synchronous states
   applied, the epoch stored) before this region's router decides by it.

Every region adopts a new epoch from the quorum; one that newly moves a peer is completed by
``take_over`` in every surviving region (each fences the failed region out of its stream).
With two regions and no third member there is no majority once the link is cut: nothing is
decided automatically (``docs/regions.md``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from tally.core.errors import Unavailable
from tally.core.regions import Placement, newest
from tally.store.ports import RegionStore, Witness

log = logging.getLogger("tally.failover")

# The share of a renewed lease a process may use: etcd may expire the lease only after all of
# it, so the rest (2 s of a 10 s lease) covers a write in flight when the share runs out.
SAFE_SHARE = 0.8

TakeOver = Callable[[str, Placement], Awaitable[None]]


class FailoverAgent:
    def __init__(self, region: str, witness: Witness, store: RegionStore,
                 initial: Placement, on_placement: Callable[[Placement], None],
                 take_over: TakeOver, clock: Callable[[], float] = time.monotonic) -> None:
        """``on_placement``: hands a newly adopted map to the router at once (before this
        process may decide again); ``take_over(failed, placement)``: the operator's failover
        steps in this region (``tally.regions_admin.complete_failover``: the failed region
        fenced out of its stream, at the region taking the users their synchronous states
        applied, then the epoch stored), run before this region decides by the new map."""
        self.region = region
        self.witness = witness
        self.store = store
        self.placement = initial
        self.on_placement = on_placement
        self.take_over = take_over
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
        newly = [r for r in placement.moved if r not in before.moved and r != self.region]
        if newly and self.region not in placement.moved:
            for failed in newly:
                try:
                    await self.take_over(failed, placement)
                except Exception:  # the map waits: the next tick tries again
                    log.exception("failover could not be completed here", extra={
                        "region": self.region, "failed": failed, "epoch": placement.epoch})
                    return
            self.placement = placement
            self.on_placement(placement)
            return
        self.placement = placement
        self.on_placement(placement)  # the router first: it decides by it from now on
        if placement.epoch > before.epoch:
            await self.store.put_placement(placement)

    async def _fail_over_the_silent(self) -> None:
        placement = self.placement
        if self.region in placement.moved:
            return  # this region serves nobody: it takes nobody over
        # Members before alive: a region registers both at once, so one seen as a member here
        # is in the later read of the alive unless its lease expired since. In the other order
        # a region registering between the two reads is a member that is not alive: failed
        # over as it starts.
        members = await self.witness.members()
        alive = await self.witness.alive()
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
