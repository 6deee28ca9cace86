"""A failed fsync of the likes WAL under load, then a power cut.

After the failure the writes waiting on that sync fail (503) and no later write is acknowledged:
the kernel may have dropped the pages it could not write and marked them clean, so a retried fsync
would report success for data that is gone. The service says so in /readyz and /metrics. Then
the power goes (every unsynced write dropped, including those the failed sync covered) and after
the restart every acknowledged like is still there, and the counts equal a recount.
"""

from __future__ import annotations

import anyio
import httpx
import pytest

from tally_dev.faultfs import FaultFS
from tests.faults.harness import Ledger, Server, check_recovered, load, report

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def wait_for(condition: object, timeout_s: float = 60) -> None:
    with anyio.fail_after(timeout_s):
        while not condition():  # type: ignore[operator]
            await anyio.sleep(0.005)


async def test_failed_wal_fsync_stops_writes_and_loses_nothing_acknowledged(
        faultfs: FaultFS) -> None:
    server = Server(faultfs.mountpoint / "data", faultfs.log.with_name("server.log"))
    ledger = Ledger()
    server.start()
    try:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(load, server.url, ledger, 7, stop, 10_000, 0.05)
            await wait_for(lambda: ledger.acks >= 40)
            faultfs.fail_next_sync("tally.db-wal")
            await wait_for(lambda: ledger.refused > 0)
            await wait_for(lambda: ledger.sent_after_refusal >= 50)
            stop.set()
        assert ledger.acked_after_refusal == 0
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            ready = await c.get("/readyz")
            assert ready.status_code == 503 and "fsync" in ready.json()["reason"]
            metrics = (await c.get("/metrics")).text
            assert "tally_write_stopped_by_sync_failure 1.0" in metrics
            refused = await c.post("/v1/like", json={"user_id": 1, "item_type": "post",
                                                     "item_id": 1})
            assert refused.status_code == 503
            assert (await c.post("/v1/has", json={"user_id": 1, "items": [
                {"item_type": "post", "item_id": 1}]})).status_code == 200  # reads go on
        assert faultfs.stats()["failed_syncs"] == 1
        await anyio.to_thread.run_sync(server.kill_all)
        undone = await anyio.to_thread.run_sync(faultfs.cut)
        server.start()
        check = await check_recovered(server, ledger)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            again = await c.post("/v1/like", json={"user_id": 1, "item_type": "post",
                                                   "item_id": 1})
            assert again.status_code == 200  # the restart cleared the stop
    finally:
        server.stop()
    report("fsync-eio", acknowledged=ledger.acks, refused=ledger.refused,
           sent_after_refusal=ledger.sent_after_refusal,
           acked_after_refusal=ledger.acked_after_refusal, unsynced_bytes_dropped=undone,
           losses=check.losses)
    assert check.losses == 0
    assert not check.drift
