"""Advisory-lock leases: work is shared out, never held twice, and taken over when a member dies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from tally.store.postgres.leases import PgLeases, PgLeaseSession
from tests.workers.owners import Owners

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

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
    a, b = (owners.member(PgLeases(dsn), n, period_s=0.05) for n in ("a", "b"))
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
