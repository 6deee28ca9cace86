"""What the regions' own processes logged, shown by a failed regions test: the clusters live in
temporary directories deleted with the test, and a failover's reasons are only in the Tally
processes' logs. ``FAILED`` is set by the hook in this package's conftest."""

from __future__ import annotations

import json

import pytest

from tally_dev.regions import RegionCluster

FAILED = pytest.StashKey[bool]()


def print_logs_if_failed(request: pytest.FixtureRequest, rc: RegionCluster,
                         lines: int = 60) -> None:
    """The warnings and errors of every region's Tally process (the last ``lines`` each), into
    the failed test's captured output."""
    if not request.node.stash.get(FAILED, False):
        return
    for region in rc.regions:
        path = rc.root / region / "procs" / f"tally-{region}.log"
        if not path.exists():
            continue
        kept = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                level = json.loads(line).get("level")
            except ValueError:
                level = "raw"
            if level != "info":
                kept.append(line[:400])
        print(f"--- tally-{region}: the last {lines} warnings and errors ---")
        print("\n".join(kept[-lines:]))
