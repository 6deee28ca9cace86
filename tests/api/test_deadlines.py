"""The body deadline's sleeper: a deadline not cleared in time acts (at most a tick late), a
cleared one never does, and the sleeper stops once nothing is due."""

from __future__ import annotations

import asyncio

import pytest

from tally.api.deadlines import Deadlines

pytestmark = pytest.mark.anyio


async def test_only_the_deadline_left_standing_acts() -> None:
    loop = asyncio.get_running_loop()
    d = Deadlines()
    fired: list[str] = []
    d.set("slow", 0.08, lambda: fired.append("slow"), loop)
    d.set("fast", 0.08, lambda: fired.append("fast"), loop)
    d.clear("fast")
    started = loop.time()
    while not fired and loop.time() - started < 2.0:
        await asyncio.sleep(0.01)
    assert fired == ["slow"]
    assert 0.08 <= loop.time() - started < 0.08 + 0.5
    await asyncio.sleep(0.1)
    assert d._sweeper is None  # nothing due: no task left behind
