"""A full disk: writes answer 503, reads go on, nothing is corrupted, and writes resume by
themselves once space returns (no restart), with the counts equal to a recount.

The filesystem refuses only what would grow a file (ENOSPC), as a real one does: a transaction that
fits in the WAL's existing frames may still commit, so the test sends bulks large enough to need
new ones.
"""

from __future__ import annotations

import random

import anyio
import httpx
import pytest

from tally_dev.faultfs import FaultFS
from tests.faults.harness import (
    ITEMS,
    USERS_PER_WORKER,
    WORKERS,
    Ledger,
    Pair,
    Server,
    check_recovered,
    integrity,
    load,
    report,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def bulk(c: httpx.AsyncClient, ledger: Ledger, rng: random.Random) -> int:
    """A bulk over every pair (each user's ops in one request: the ledger stays exact)."""
    pairs: dict[Pair, bool] = {(u, i): rng.random() < 0.6
                               for u in range(WORKERS * USERS_PER_WORKER) for i in range(ITEMS)}
    sent_at = ledger.sent(pairs)
    r = await c.post("/v1/bulk", json={"ops": [
        {"op": "like" if on else "unlike", "user_id": u, "item_type": "post", "item_id": i}
        for (u, i), on in pairs.items()]})
    ledger.answered(pairs, r.status_code, sent_at)
    return r.status_code


async def test_full_disk_refuses_writes_keeps_reads_and_recovers_without_restart(
        faultfs: FaultFS) -> None:
    server = Server(faultfs.mountpoint / "data", faultfs.log.with_name("server.log"))
    ledger = Ledger()
    rng = random.Random(17)
    server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            assert await bulk(c, ledger, rng) == 200
            faultfs.set_full(True)
            statuses = [await bulk(c, ledger, rng) for _ in range(5)]
            assert 503 in statuses
            items = [{"item_type": "post", "item_id": i} for i in range(ITEMS)]
            reads = [await c.post("/v1/counts", json={"items": items, "counters": ["like"]}),
                     await c.post("/v1/has", json={"user_id": 3, "items": items})]
            assert [r.status_code for r in reads] == [200, 200]
            assert integrity(server.db) == []
            faultfs.set_full(False)
            with anyio.fail_after(60):
                while await bulk(c, ledger, rng) != 200:
                    await anyio.sleep(0.2)
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:  # the mixed load runs again
            tg.start_soon(load, server.url, ledger, 3, stop)
            with anyio.fail_after(60):
                while ledger.acks < 60:
                    await anyio.sleep(0.01)
            stop.set()
        check = await check_recovered(server, ledger)
    finally:
        server.stop()
    report("full-disk", refused_while_full=statuses.count(503), bulks_while_full=len(statuses),
           acknowledged=ledger.acks, losses=check.losses)
    assert check.losses == 0
    assert not check.drift
