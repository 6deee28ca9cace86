"""Lease balancing against the ``Leases`` port held in memory: no engine, so every step is quick.

``tests/workers/test_leases.py`` runs the same balancing on PostgreSQL advisory locks; this one
checks the worker side alone: fair shares, takeover after a lost session, nothing held twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from tally.core.errors import Unavailable
from tests.workers.owners import Owners

pytestmark = pytest.mark.anyio



class MemoryLeases:
    """The ``Leases`` port in process memory: a session's locks and slot go when it ends."""

    def __init__(self) -> None:
        self.slots: dict[str, set[int]] = {}
        self.locks: dict[tuple[str, int], MemorySession] = {}

    async def session(self, kind: str) -> MemorySession:
        taken = self.slots.setdefault(kind, set())
        slot = min(set(range(len(taken) + 1)) - taken)
        taken.add(slot)
        return MemorySession(self, kind, slot)


class Link:
    """One member's way to the lease store, which a test can cut (a network partition, a
    crashed process): the session dies at once and no new one can be opened until restored."""

    def __init__(self, store: MemoryLeases) -> None:
        self.store = store
        self.up = True
        self.sessions: list[MemorySession] = []

    async def session(self, kind: str) -> MemorySession:
        if not self.up:
            raise Unavailable("lease store unreachable")
        self.sessions.append(await self.store.session(kind))
        return self.sessions[-1]

    def cut(self) -> None:
        self.up = False
        for session in self.sessions:
            session.die()


class MemorySession:
    def __init__(self, store: MemoryLeases, kind: str, slot: int) -> None:
        self.store, self.kind, self.slot = store, kind, slot
        self.ended = False

    def _alive(self) -> None:
        if self.ended:
            raise Unavailable("lease session lost")

    async def members(self) -> int:
        self._alive()
        return len(self.store.slots[self.kind])

    async def try_take(self, index: int) -> bool:
        self._alive()
        return self.store.locks.setdefault((self.kind, index), self) is self

    async def give_back(self, index: int) -> None:
        self._alive()
        if self.store.locks.get((self.kind, index)) is self:
            del self.store.locks[(self.kind, index)]

    async def close(self) -> None:
        self.die()

    def die(self) -> None:
        """What a crashed process's session does: every lock and the slot are free at once."""
        if not self.ended:
            self.ended = True
            self.store.slots[self.kind].discard(self.slot)
            for key in [k for k, s in self.store.locks.items() if s is self]:
                del self.store.locks[key]


async def until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout_s, "condition not reached"
        await asyncio.sleep(0.005)


async def test_members_take_fair_shares_and_take_over_a_lost_sessions_keys() -> None:
    leases, owners = MemoryLeases(), Owners()
    links = {n: Link(leases) for n in ("a", "b", "c")}
    a, b, c = (owners.member(links[n], n, period_s=0.005) for n in ("a", "b", "c"))
    for member in (a, b, c):
        member.start()
    await until(lambda: owners.shares(("a", "b", "c")) == [2, 3, 3])
    owners.crashed.add("c")
    links["c"].cut()
    await until(lambda: c.stats.lost >= 1 and "c" not in owners.owner.values()
                and owners.shares(("a", "b", "c")) == [0, 4, 4])
    owners.crashed.clear()
    links["c"].up = True
    await until(lambda: owners.shares(("a", "b", "c")) == [2, 3, 3])  # c joins again with a new session
    for member in (a, b, c):
        await member.stop()
    assert owners.owner == {} and leases.locks == {} and leases.slots["test"] == set()
