"""Automatic failover through the witness quorum (etcd: a member per region and a witness in a
namespace of its own), two regions under load with a client ledger: no majority, a cut that
leaves the witness with eu, a kill; the no-op decision and late views at the rejoin
(``tally_dev.regions_failover``; ``make chaos-regions`` runs it longer, and three regions)."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tally_dev import netns
from tally_dev.ha import etcd_bin
from tally_dev.regions import RegionCluster
from tally_dev.regions_failover import run_witness
from tests.engines import require
from tests.regions.failure_logs import print_logs_if_failed

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def witnessed(engines_dir: Path, request: pytest.FixtureRequest) -> Iterator[RegionCluster]:
    if (why := netns.available()) is not None:
        pytest.skip(why)
    for engine in ("postgres", "redis", "nats"):
        require(engine)
    if etcd_bin() is None:
        pytest.skip("etcd not installed (apt-get install etcd-server)")
    rc = RegionCluster(engines_dir / "witnessed", partitions=2, die_with_parent=True)
    rc.up(2, net=random.randrange(200, 250), witness=True, witness_ttl_s=4.0)
    try:
        yield rc
    finally:
        print_logs_if_failed(request, rc)
        rc.down()


@pytest.mark.timeout(600)
def test_witness_fails_over_the_side_without_the_majority_and_only_it(
        witnessed: RegionCluster) -> None:
    out = asyncio.run(run_witness(witnessed, users=40, items=8, clients=3, phase_s=2.0,
                                  recover=False))
    print(json.dumps(out, indent=1, default=str))
    # no majority anywhere: nothing moved, each region refused its own users' toggles
    assert out["no_majority"]["epochs"] == {"us": 1, "eu": 1}
    assert out["no_majority"]["home_toggle_status"] == {"us": 503, "eu": 503}
    # us cut from eu and the witness: us fenced itself before eu took over (lease share)
    cut = out["cut"]
    assert cut["us_fenced_after_s"] < cut["failover_after_s"]
    assert cut["split_brain"]["decided_by_two_in_one_epoch"] == []
    assert cut["split_brain"]["decisions"] > 0
    # the late like lost to the unlike made at eu on its stale view (a recorded no-op)
    late_conflicts = [c for c in cut["rejoin"]["conflicts"] if c[1] == "post:950"]
    assert len(late_conflicts) == 1
    assert cut["noop_case_state"] == {"us": False, "eu": False}
    assert cut["views_951"] == {"us": 8, "eu": 8}  # late views added once, none lost
    assert out["after_cut"] == {"us": {}, "eu": {}}
    assert cut["read_failures_eu"] == 0
    # us killed: eu took over by itself (target: 30 s) and its reads never stopped; eu's counts
    # alone, before any rejoin or recount, equal the ledger but for the items of writes us may
    # have decided before its death (sent before it) that eu lacks (the async window)
    assert out["kill"]["failover_after_s"] < 30
    assert out["kill"]["read_failures_eu"] == 0
    assert out["kill"]["eu_off_ledger_not_at_risk"] == {}
