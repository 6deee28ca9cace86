"""Writes in a region: decided at the user's home region, forwarded there from anywhere else.

``RegionRouter`` is the ``LikeStore`` the service writes through when regions are on. Each toggle
goes to its user's home under the newest placement it has read (``refresh``): local ones to this
region's store, the others to their home region's API (``RemoteWriter``), which decides and
answers; the answer (state, and the count there including this change) goes back to the client
as is, so the acting user sees their own change at once wherever they wrote. A request whose
toggles have several homes is split per home: all or nothing holds within each home region, not
across them (as across databases of one region, a failed request is retried whole; toggles are
idempotent). Increments are not homed: any region counts them (a sum has no conflicts).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Protocol

from tally.core.model import Op, OpResult, ToggleOp
from tally.core.regions import Placement, newest
from tally.store.ports import LikeStore, RegionStore


class RemoteWriter(Protocol):
    async def write(self, region: str, ops: Sequence[Op]) -> list[OpResult]:
        """Run the ops at ``region``'s API; raises ``Unavailable`` when it cannot be reached."""

    async def close(self) -> None: ...


class RegionRouter:
    def __init__(self, region: str, local: LikeStore, store: RegionStore, remote: RemoteWriter,
                 initial: Placement) -> None:
        self.region = region
        self.local = local
        self.store = store
        self.remote = remote
        self.placement = initial
        self.forwarded = 0
        self.forward_seconds = 0.0

    async def start(self) -> None:
        await self.store.put_placement(self.placement)  # epoch 1 once, never changed
        await self.refresh()

    async def close(self) -> None:
        await self.remote.close()

    async def refresh(self) -> None:
        """Take the newest placement stored in this region (failover writes a new epoch)."""
        self.placement = newest(self.placement, await self.store.placement()) or self.placement

    def home(self, op: Op) -> str:
        return self.placement.home_of(op.user) if isinstance(op, ToggleOp) else self.region

    async def write(self, ops: Sequence[Op]) -> list[OpResult]:
        homes = [self.home(op) for op in ops]
        if all(h == self.region for h in homes):
            return await self.local.write(ops)
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

    async def _write_at(self, home: str, ops: list[Op]) -> list[OpResult]:
        if home == self.region:
            return await self.local.write(ops)
        t0 = time.perf_counter()
        try:
            return await self.remote.write(home, ops)
        finally:
            self.forwarded += len(ops)
            self.forward_seconds += time.perf_counter() - t0

    async def has(self, counter: str, user: str, items: Sequence[str]) -> list[bool]:
        """From this region's records (the home region's, replicated: stale by the lag)."""
        return await self.local.has(counter, user, items)
