"""Writes in a region: decided at the user's home region, forwarded there from anywhere else.

``RegionRouter`` is the ``LikeStore`` the service writes through when regions are on. Each toggle
goes to its user's home under the newest placement it has read (``refresh``): local ones to this
region's store, the others to their home region's API (``RemoteWriter``), which decides and
answers; the answer (state, and the count there including this change) goes back to the client
as is, so the acting user sees their own change at once wherever they wrote. A request whose
toggles have several homes is split per home: all or nothing holds within each home region, not
across them (as across databases of one region, a failed request is retried whole; toggles are
idempotent). Increments are not homed: any region counts them (a sum has no conflicts).

Synchronous counters (``sync_counters``, replication = "sync"): after the home region's commit,
the resulting state of each of their toggles is held by a peer region's log (``PeerHold``)
before the write is answered. Every toggle op is held, a no-op too: a client retrying a write
whose first answer was lost (or refused because no peer answered) must not be acknowledged on
the strength of a commit no peer holds. When no peer holds it the write is refused (503,
Retry-After): it stays committed here and replicates asynchronously, but is not promised.
One exception: a region left serving alone by failovers (every peer failed over by an operator,
the placement says so) acknowledges on its own, as PostgreSQL's non-strict synchronous mode
does; otherwise losing one of two regions would stop every synchronous write until it rejoined.
Those writes are counted (``held_alone``): they are at risk as async ones are.

A toggle that changes nothing, by a user this region took over in a failover, is still recorded
as a decision (its time): an unlike of a like the failed region acknowledged but never
replicated is the user's newer intent, and the rejoin must not apply that like over it.

With automatic failover (``tally.workers.failover``) a region decides for its users only while
its witness lease is safe (``may_decide``): a region cut off from the quorum's majority may have
been failed over already, so its users' toggles fail with 503 until it learns the new epoch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Sequence
from typing import Protocol

from tally.core.errors import Unavailable
from tally.core.model import Op, OpResult, ToggleOp
from tally.core.regions import Placement, newest
from tally.store.ports import HeldState, LikeStore, PeerHold, RegionStore


class RemoteWriter(Protocol):
    async def write(self, region: str, ops: Sequence[Op]) -> list[OpResult]:
        """Run the ops at ``region``'s API; raises ``Unavailable`` when it cannot be reached."""

    async def close(self) -> None: ...


class RegionRouter:
    def __init__(self, region: str, local: LikeStore, store: RegionStore, remote: RemoteWriter,
                 initial: Placement, peer_hold: PeerHold | None = None,
                 sync_counters: Collection[str] = (),
                 on_hold: Callable[[float], None] | None = None) -> None:
        """``peer_hold``: where synchronous states are held (None: regions without one);
        ``on_hold``: told each hold's wait in seconds (a histogram)."""
        self.region = region
        self.local = local
        self.store = store
        self.remote = remote
        self.placement = initial
        self.peer_hold = peer_hold
        self.sync_counters = frozenset(sync_counters)
        self._on_hold = on_hold or (lambda _s: None)
        self.forwarded = 0
        self.forward_seconds = 0.0
        self.held_ops = 0
        self.hold_seconds = 0.0
        self.hold_refusals = 0
        self.held_alone = 0
        self.may_decide: Callable[[], bool] | None = None  # set with a witness: the lease check
        self.fenced_ops = 0

    async def start(self) -> None:
        if self.peer_hold is not None:
            await self.peer_hold.start()
        await self.store.put_placement(self.placement)  # epoch 1 once, never changed
        await self.refresh()

    async def close(self) -> None:
        await self.remote.close()
        if self.peer_hold is not None:
            await self.peer_hold.close()

    async def refresh(self) -> None:
        """Take the newest placement stored in this region (failover writes a new epoch)."""
        self.adopt(await self.store.placement())

    def adopt(self, placement: Placement | None) -> None:
        """Take ``placement`` if its epoch is newer than the one in force."""
        self.placement = newest(self.placement, placement) or self.placement

    def home(self, op: Op) -> str:
        return self.placement.home_of(op.user) if isinstance(op, ToggleOp) else self.region

    async def write(self, ops: Sequence[Op]) -> list[OpResult]:
        homes = [self.home(op) for op in ops]
        if all(h == self.region for h in homes):
            return await self._decide(ops)
        by_home: dict[str, list[int]] = {}
        for i, h in enumerate(homes):
            by_home.setdefault(h, []).append(i)
        parts = await asyncio.gather(*(self._write_at(h, [ops[i] for i in idx])
                                       for h, idx in by_home.items()))
        results: list[OpResult | None] = [None] * len(ops)
        for idx, got in zip(by_home.values(), parts, strict=True):
            for i, res in zip(idx, got, strict=True):
                results[i] = res
        return [r for r in results if r is not None]

    async def _decide(self, ops: Sequence[Op]) -> list[OpResult]:
        """Ops this region decides: toggles only while its witness lease is safe."""
        if self.may_decide is not None and not self.may_decide() and any(
                isinstance(op, ToggleOp) for op in ops):
            self.fenced_ops += len(ops)
            raise Unavailable(f"region {self.region} lost its witness quorum: it may have been "
                              "failed over, so it decides no toggles until it knows")
        results = await self._write_here(ops)
        noops = [((op.counter, op.user, op.item), op.on, time.time())
                 for op, res in zip(ops, results, strict=True)
                 if isinstance(op, ToggleOp) and not res.changed and self.took_over(op.user)]
        if noops:
            await self.store.record_noops(noops)
        return results

    def took_over(self, user: str) -> bool:
        """Whether this region decides for the user only because a failover moved them here:
        the failed region may come back with changes of theirs this region never saw."""
        return self.placement.home_of(user) != self.placement.restore_all().home_of(user)

    async def _write_at(self, home: str, ops: list[Op]) -> list[OpResult]:
        if home == self.region:
            return await self._decide(ops)
        t0 = time.perf_counter()
        try:
            return await self.remote.write(home, ops)
        finally:
            self.forwarded += len(ops)
            self.forward_seconds += time.perf_counter() - t0

    async def _write_here(self, ops: Sequence[Op]) -> list[OpResult]:
        results = await self.local.write(ops)
        if self.sync_counters:
            await self._hold([op for op in ops if isinstance(op, ToggleOp)
                              and op.counter in self.sync_counters])
        return results

    async def _hold(self, ops: list[ToggleOp]) -> None:
        if not ops:
            return
        if self.peer_hold is None:
            raise Unavailable("synchronous counters need a peer region's log, and none is "
                              "configured", retry_after_s=1.0)
        now = time.time()  # after the commit: the newest state of each (user, item) wins
        t0 = time.perf_counter()
        try:
            await self.peer_hold.hold([HeldState(op.counter, op.user, op.item, op.on, now)
                                       for op in ops])
        except Unavailable:
            if self.placement.serving() == [self.region]:
                self.held_alone += len(ops)
                return
            self.hold_refusals += len(ops)
            raise
        waited = time.perf_counter() - t0
        self.held_ops += len(ops)
        self.hold_seconds += waited
        self._on_hold(waited)

    async def has(self, counter: str, user: str, items: Sequence[str]) -> list[bool]:
        """From this region's records (the home region's, replicated: stale by the lag)."""
        return await self.local.has(counter, user, items)
