"""The regions' witness quorum (``EtcdWitness``) against a real etcd member (a quorum of one):
what a process writes to say its region is alive. The agent's rules are in
``tests/workers/test_failover.py``; ``tests/regions/test_failover_e2e.py`` runs both across
regions."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tally.store.etcd.witness import PREFIX, EtcdWitness, _b64, _prefix_end, _unb64
from tally_dev.engines import free_port
from tally_dev.ha import EtcdEngine, etcd_bin

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


@pytest.fixture
def etcd_url(engines_dir: Path) -> Iterator[str]:
    if etcd_bin() is None:
        pytest.skip("etcd not installed (apt-get install etcd-server)")
    engine = EtcdEngine(engines_dir / f"etcd-witness-{free_port()}", "solo",
                        {"solo": free_port()})
    engine.die_with_parent = True
    engine.start()
    try:
        deadline = time.monotonic() + 30
        while not engine.healthy():
            assert time.monotonic() < deadline, "etcd never became healthy"
            time.sleep(0.1)
        yield engine.url
    finally:
        engine.stop()


async def test_a_region_is_registered_a_member_and_alive_in_one_write(etcd_url: str) -> None:
    witness = EtcdWitness([etcd_url], "eu", ttl_s=4.0)
    try:
        await witness.keepalive()
        got = await witness._call("/v3/kv/range", {"key": _b64(PREFIX),
                                                   "range_end": _prefix_end(PREFIX)})
        revisions = {_unb64(kv["key"]): int(kv["mod_revision"]) for kv in got["kvs"]}
        assert set(revisions) == {f"{PREFIX}members/eu", f"{PREFIX}alive/eu/{witness.process}"}
        # One revision: no reader ever sees the region a member that is not alive (a peer
        # would fail it over as it starts).
        assert len(set(revisions.values())) == 1
        assert await witness.members() == {"eu"} and await witness.alive() == {"eu"}
    finally:
        await witness.close()
    after = EtcdWitness([etcd_url], "us", ttl_s=4.0)
    try:  # closed: its lease revoked, no longer alive, still a member
        assert await after.alive() == set() and await after.members() == {"eu"}
    finally:
        await after.close()
