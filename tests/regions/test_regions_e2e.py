"""Two regions, each in its own network namespace, under load with a client ledger: forwarding,
cross-region visibility, a real partition and heal, a region SIGKILLed, failed over and rejoined
(``tally_dev.regions_chaos``; ``make chaos-regions`` runs it longer)."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tally_dev import netns
from tally_dev.regions import RegionCluster
from tally_dev.regions_chaos import run
from tests.engines import require
from tests.regions.failure_logs import print_logs_if_failed

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def regions(engines_dir: Path, request: pytest.FixtureRequest) -> Iterator[RegionCluster]:
    if (why := netns.available()) is not None:
        pytest.skip(why)
    for engine in ("postgres", "redis", "nats"):
        require(engine)
    rc = RegionCluster(engines_dir / "regions", partitions=4, die_with_parent=True)
    rc.up(2, net=random.randrange(100, 150))
    try:
        yield rc
    finally:
        print_logs_if_failed(request, rc)
        rc.down()


@pytest.mark.timeout(600)
def test_regions_converge_to_the_ledger_through_partition_kill_and_rejoin(
        regions: RegionCluster) -> None:
    out = asyncio.run(run(regions, users=80, items=16, clients=4, phase_s=4.0, probes=10))
    print(json.dumps(out, indent=1, default=str))
    assert out["after_heal"] == {"us": {}, "eu": {}}  # no repair needed after a partition
    assert out["after_async_kill"] == {"us": {}, "eu": {}}  # delayed by the kill, not lost
    assert out["after_rejoin"] == {"us": {}, "eu": {}}
    assert out["after_rejoin_fresh"] == {"us": {}, "eu": {}}
    assert out["read_failures_through_partition"] == {} and out["reads"] > 0
    assert out["eu_read_failures_us_dead"] == 0  # the survivor's reads never stopped
    assert out["at_risk_likes"] == 1  # the like made at us while cut off, before the kill
    assert out["rejoin"]["applied"] >= 1  # ... applied at eu by the rejoin, not lost
    assert [tuple(c) for c in out["rejoin"]["conflicts"]] == [(out["rejoin"]["conflicts"][0][0],
                                                              "post:900")]
    assert out["visibility_ms"]["count"]["n"] == 10  # every probe's like arrived
