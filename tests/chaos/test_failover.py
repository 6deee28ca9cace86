"""The HA dev topology under a client ledger: a shard primary SIGKILLed mid-load.

Patroni promotes the synchronous standby and brings the old primary back as a standby; every
Tally process finds the new primary through its multi-host DSN with no restart. Every acknowledged
state must read back, and the counts must equal the ledger's recount and the server's.
(`make chaos` runs the other scenarios: wiped disk, node crash, NATS, relay + aggregator, etcd.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tally_dev.chaos.cli import CHAOS_SETTINGS
from tally_dev.chaos.ledger import Ledger
from tally_dev.chaos.scenarios import SCENARIOS, run
from tally_dev.cluster import DevCluster, Layout
from tally_dev.ha import missing_ha_binaries
from tests.engines import require

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def ha_cluster(engines_dir: Path) -> Iterator[DevCluster]:
    for engine in ("postgres", "redis", "nats"):
        require(engine)
    if missing_ha_binaries():
        pytest.skip("; ".join(missing_ha_binaries()))
    dev = DevCluster(engines_dir / "ha-cluster", Layout(ha=True, relays=2), settings=CHAOS_SETTINGS)
    dev.up()
    try:
        yield dev
    finally:
        dev.down(timeout_s=3.0)  # throwaway data: no need to wait for clean shutdowns


def roles_of(dev: DevCluster) -> dict[str, str]:
    return {row["name"]: row.get("role", "") for row in dev.status()}


@pytest.mark.timeout(600)
async def test_a_killed_primary_fails_over_with_no_acknowledged_write_lost(
        ha_cluster: DevCluster) -> None:
    dev = ha_cluster
    before = roles_of(dev)
    for db in (0, 1):
        assert sorted(before[f"pg{db}-{s}.postgres"] for s in "ab") == ["primary", "sync standby"]
    assert "stream leader" in [before[f"nats-{i}"] for i in range(3)]

    ledger = Ledger(dev.urls("api"), users=200, items=30, clients=6)
    row = await run(dev, SCENARIOS["pg-primary"], warmup_s=3.0, after_s=3.0, ledger=ledger)
    print(f"\n{row}")
    assert row["acked"] > row["acked_before_fault"] > 0
    assert row["lost"] == 0, "an acknowledged like or unlike did not read back"
    assert row["converged"] and row["drift"] == 0, "counts differ from the ledger's recount"
    assert row["server_recount_drifts"] == 0, "counts differ from the server's recount"
    after = roles_of(dev)
    assert after[row["killed"]] == "sync standby", "the killed primary did not return as standby"
