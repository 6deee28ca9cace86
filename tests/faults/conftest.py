"""The ``faultfs`` fixture: a FaultFS mount in the test's temporary directory, unmounted after."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tally_dev.faultfs import FaultFS, available


@pytest.fixture
def faultfs(tmp_path: Path) -> Iterator[FaultFS]:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine: storage-fault tests need FUSE")
    missing = available()
    if missing is not None:  # FUSE is there, the tools are not: scripts/ensure-engines.sh
        pytest.fail(f"faultfs cannot run: {missing}")
    fs = FaultFS(tmp_path / "backing", tmp_path / "mnt", tmp_path / "faultfs.log").mount()
    try:
        yield fs
    finally:
        fs.unmount(grace_s=2.0)  # the test is done with the data: no need to wait the daemon out
