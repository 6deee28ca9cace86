"""``replication = "sync"`` for likes, async for saves, in two regions under load with a client
ledger: a region SIGKILLed with its disks lost, failed over; no acknowledged like lost, every
lost save listed (``tally_dev.regions_sync``; ``make chaos-regions`` runs it longer)."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from tally_dev import netns
from tally_dev.regions import RegionCluster
from tally_dev.regions_sync import ASYNC, SYNC, run
from tests.engines import require

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(400)
def test_sync_likes_survive_a_region_lost_with_its_disks(engines_dir: Path) -> None:
    if (why := netns.available()) is not None:
        pytest.skip(why)
    for engine in ("postgres", "redis", "nats"):
        require(engine)
    rc = RegionCluster(engines_dir / "regions-sync", partitions=4, die_with_parent=True,
                       sync_counters=(SYNC,))
    rc.up(2, net=random.randrange(150, 200))
    try:
        out = asyncio.run(run(rc, users=40, items=8, clients=4, phase_s=2.0))
    finally:
        rc.down()
    print(json.dumps(out, indent=1, default=str))
    cut = out["refused_while_cut"]
    assert cut[SYNC]["status"] == 503 and cut[SYNC]["retry_after"] == "1"  # no peer holds it
    assert cut[ASYNC]["status"] == 200  # async: taken by the home region alone
    assert {"pg", "nats", "redis"} <= set(out["wiped"]) and out["checked"][SYNC] > 0
    # the kill found acknowledged likes eu lacked (replication stalled), then held ones applied
    assert out["at_risk_at_kill"][SYNC] and out["at_risk_at_kill"][ASYNC]
    assert not out["us_sync_fenced_at_eu_before"]  # eu held us's synchronous states ...
    assert out["us_sync_fenced_at_eu"]  # ... and after the failover a running us gets no ack
    assert out["lost"][SYNC] == []  # zero acknowledged likes lost with the region's disks
    assert out["lost"][ASYNC]  # async: what eu lacked at the kill is lost, and listed
    assert max(x["acked_before_kill_s"] for x in out["lost"][ASYNC]) <= out["async_window_s"]
    assert out["after_failover"] == {SYNC: {}, ASYNC: {}}  # counts = ledger, less listed losses
    assert out["hold_waits_eu_alone"]["alone"] >= 1  # the survivor, alone, takes likes again
    assert out["drifts_eu"] == []  # counts = a recount of eu's records
    assert out["latency"][f"{SYNC} direct"]["n"] > 0 and out["latency"][f"{ASYNC} direct"]["n"] > 0
