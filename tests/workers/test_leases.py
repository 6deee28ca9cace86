"""Advisory-lock leases: work is shared out, never held twice, and taken over when a member dies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from tally.store.postgres.leases import PgLeases, PgLeaseSession
from tally.workers.leases import LeaseSet

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

KEYS = [f"p{n}" for n in range(8)]


class Owners:
    """Who runs each key; fails the test if two members ever run the same one."""

    def __init__(self) -> None:
        self.owner: dict[str, str] = {}
        self.crashed: set[str] = set()  # a crashed member's work may overlap (the fence's job)

    def member(self, dsn: str, name: str) -> LeaseSet:
        async def gain(key: str) -> None:
            runner = self.owner.get(key)
            assert runner is None or runner in self.crashed, f"{key}: {name} gained, {runner} runs"
            self.owner[key] = name

        async def lose(key: str) -> None:
            if self.owner.get(key) == name:
                del self.owner[key]
            else:
                assert name in self.crashed

        return LeaseSet(PgLeases(dsn), "test", KEYS, gain, lose, period_s=0.05)

    def held(self, name: str) -> int:
        return sum(1 for v in self.owner.values() if v == name)


async def until(cond: Callable[[], bool], timeout_s: float = 10.0) -> float:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout_s, "condition not reached"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_members_share_keys_and_a_dead_members_keys_are_taken_over(pg_database:
                                                                         Callable[[], str]) -> None:
    dsn = pg_database()
    owners = Owners()
    a, b = owners.member(dsn, "a"), owners.member(dsn, "b")
    a.start()
    await until(lambda: owners.held("a") == 8)
    b.start()
    await until(lambda: owners.held("a") == 4 and owners.held("b") == 4)
    assert a.stats.members == 2 and b.stats.members == 2
    session = a.session  # the process dies: its connection goes, and with it its locks
    assert isinstance(session, PgLeaseSession)
    owners.crashed.add("a")
    session.terminate()
    await until(lambda: owners.held("b") == 8 and a.stats.lost == 1)
    owners.crashed.clear()
    await until(lambda: owners.held("a") == 4 and owners.held("b") == 4)  # a reconnects
    await a.stop()
    await until(lambda: owners.held("b") == 8)
    await b.stop()
    assert owners.owner == {}
