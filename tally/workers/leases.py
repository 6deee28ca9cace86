"""Leases on shared work (log partitions, outbox shards), balanced over the live members.

Each process keeps one lease session per kind of work (``Leases.session``: in the cluster, one
PostgreSQL connection holding advisory locks), and with it a member slot, so the live members can
be counted and the work shared out: each aims at ceil(keys / members) keys, takes free keys while
below that, and gives keys back (after stopping their work) while above it. A process that dies
loses its session, and with it every lease; takeover is then one balancing period away
(``period_s``).

A lease alone is not enough: between losing its session and noticing, a process may still
finish a round of work. What makes that late write harmless is the work's own fence (the
aggregator's conditional watermark update, the relay's idempotent publish), not the lease; the
lease is what keeps two processes from doing the same work all the time.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from tally.core.errors import Unavailable
from tally.store.ports import Leases, LeaseSession

log = logging.getLogger("tally.leases")


def cancelled() -> bool:
    """Whether the running task has been asked to stop.

    Some driver calls turn a cancellation into their own error (nats-py raises
    ConnectionClosedError from a cancelled wait on a closed connection); a worker loop that
    retries on errors checks this before retrying, so a cancellation is never swallowed.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def stop_task(task: asyncio.Task[None], what: str, timeout_s: float = 5.0) -> None:
    """Cancel a worker task and wait for it, bounded: a stuck worker is logged, not waited on
    forever (its late writes are fenced by the watermarks)."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        log.error("worker did not stop in time", extra={"worker": what, "timeout_s": timeout_s})
    elif not task.cancelled() and task.exception() is not None:
        log.warning("worker ended with an error", extra={"worker": what,
                                                         "error": repr(task.exception())})


@dataclass
class LeaseStats:
    held: int = 0
    members: int = 0
    acquired: int = 0
    released: int = 0
    lost: int = 0  # session losses (every lease gone at once)


class LeaseSet:
    """Balances ``keys`` of one ``kind`` over the live members, calling back on gain and loss.

    ``on_gain(key)`` starts the key's work; ``on_loss(key)`` stops it and returns once it stopped.
    """

    def __init__(self, leases: Leases, kind: str, keys: Sequence[str],
                 on_gain: Callable[[str], Awaitable[None]],
                 on_loss: Callable[[str], Awaitable[None]], period_s: float = 0.5) -> None:
        self.leases = leases
        self.kind = kind
        self.keys = list(keys)
        self.on_gain = on_gain
        self.on_loss = on_loss
        self.period_s = period_s
        self._index = {key: i for i, key in enumerate(self.keys)}  # every member has the same list
        self.session: LeaseSession | None = None
        self.held: set[str] = set()
        self.stats = LeaseStats()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"tally-leases-{self.kind}")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task, f"{self.kind} leases")
            self._task = None
        for key in sorted(self.held):
            await self.on_loss(key)
        self.held.clear()
        await self._disconnect()

    async def _run(self) -> None:
        while True:
            try:
                await self.balance()
            except asyncio.CancelledError:
                raise
            except (OSError, Unavailable, TimeoutError) as exc:
                if cancelled():
                    raise asyncio.CancelledError from exc
                await self._lost(exc)
            await asyncio.sleep(self.period_s)

    async def _lost(self, exc: BaseException) -> None:
        """The session failed: its leases are released (or will be) by the lease store."""
        log.warning("lease session lost; giving up every lease",
                    extra={"kind": self.kind, "held": sorted(self.held), "error": repr(exc)})
        for key in sorted(self.held):
            await self.on_loss(key)
        self.held.clear()
        await self._disconnect()
        self.stats.lost += 1

    async def _disconnect(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            await session.close()

    async def balance(self) -> None:
        """One round: count members, then take or give back keys towards the fair share."""
        if self.session is None:
            self.session = await self.leases.session(self.kind)
        session = self.session
        members = max(await session.members(), 1)
        target = math.ceil(len(self.keys) / members)
        self.stats.members = members
        while len(self.held) > target:
            await self._give_back(session, max(self.held))
        if len(self.held) < target:
            await self._take(session, target)
        self.stats.held = len(self.held)

    async def _take(self, session: LeaseSession, target: int) -> None:
        start = session.slot * target  # members start at different keys: fewer collisions
        order = self.keys[start % len(self.keys):] + self.keys[:start % len(self.keys)]
        for key in order:
            if len(self.held) >= target:
                return
            if key in self.held:
                continue
            if await session.try_take(self._index[key]):
                self.held.add(key)
                self.stats.acquired += 1
                log.info("lease taken", extra={"kind": self.kind, "key": key})
                await self.on_gain(key)

    async def _give_back(self, session: LeaseSession, key: str) -> None:
        await self.on_loss(key)  # stop the work first, then let another member take it
        self.held.discard(key)
        self.stats.released += 1
        await session.give_back(self._index[key])
        log.info("lease given back", extra={"kind": self.kind, "key": key})
