"""Where the regions' NATS servers meet, as the launcher lays it out (no engine started): the
first region listening for the others, or a hub without JetStream in the witness place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tally_dev.engines import EngineError
from tally_dev.region_engines import NetNats
from tally_dev.regions import WITNESS, RegionCluster


def _laid_out(root: Path, hub: str | None) -> RegionCluster:
    rc = RegionCluster(root)
    rc.root.mkdir(parents=True)
    regions = ["us", "eu", "ap"]
    ports = {r: {k: 20000 + 10 * i + j for j, k in enumerate(
        ("pg", "nats", "monitor", "leaf", "redis", "api"))} for i, r in enumerate(regions)}
    layout = {"net": 77, "regions": regions, "ports": ports, "quorum": {},
              "witness_ttl_s": 10.0, "partitions": 2}
    if hub is not None:
        layout["hub"] = hub
        if hub == WITNESS:
            ports[WITNESS] = {"nats": 21000, "monitor": 21001, "leaf": 21002}
    rc.layout_file.write_text(json.dumps(layout))
    return rc


def _leaf(rc: RegionCluster, region: str) -> str:
    nats = rc.engines(region)["nats"]
    assert isinstance(nats, NetNats)
    nats._prepare()
    return nats.config.read_text().split("leafnodes")[1]


def test_the_hub_in_the_witness_place_has_every_region_as_a_leaf(tmp_path: Path) -> None:
    rc = _laid_out(tmp_path / "c", WITNESS)
    assert rc.hub == WITNESS and WITNESS in rc.net.regions
    hub = rc.hub_nats()
    hub._prepare()
    conf = hub.config.read_text()
    assert "jetstream" not in conf and f"listen: {rc.net.address(WITNESS)}:21002" in conf
    for region in rc.regions:  # no region listens: each dials the hub
        assert f"nats-leaf://{rc.net.address(WITNESS)}:21002" in _leaf(rc, region)


@pytest.mark.parametrize("hub", ["us", None])  # None: a layout from before the option
def test_the_hub_in_the_first_region_is_the_default(tmp_path: Path, hub: str | None) -> None:
    rc = _laid_out(tmp_path / "c", hub)
    assert rc.hub == "us" and WITNESS not in rc.net.regions
    assert "listen:" in _leaf(rc, "us")
    assert f"nats-leaf://{rc.net.address('us')}:20003" in _leaf(rc, "eu")


def test_an_unknown_hub_place_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="hub must be"):
        RegionCluster(tmp_path / "c").up(3, hub="moon")
