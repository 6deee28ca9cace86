"""``tally bench cpu`` end to end, briefly: a variant's likes are driven by wrk and its CPU is
split between the API process and the likes writer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tally_dev.bench import wrk
from tally_dev.bench.cpucompare import run

pytestmark = pytest.mark.slow


@pytest.mark.timeout(120)
def test_cpu_per_request_is_split_between_api_and_writer(tmp_path: Path) -> None:
    if not wrk.available():
        pytest.skip("wrk is not installed (make engines)")
    result = run(["uvicorn"], ["uniform"], rounds=1, duration_s=1.0, connections=4,
                 out=tmp_path)
    (row,) = result["runs"]
    assert row["errors"] == 0 and row["per_s"] > 0
    assert row["api_us"] > 0 and row["other_us"] > 0  # a like reaches the writer child
    assert "| uniform | uvicorn |" in (tmp_path / "cpu.md").read_text()


@pytest.mark.timeout(120)
def test_together_drives_every_variant_in_the_same_run(tmp_path: Path) -> None:
    if not wrk.available():
        pytest.skip("wrk is not installed (make engines)")
    tree = Path(__file__).resolve().parents[2]  # this source tree, as a --base
    result = run(["uvicorn"], ["counts"], rounds=1, duration_s=1.0, connections=4,
                 base=tree, together=True)
    rows = result["runs"]
    assert [r["variant"] for r in rows] == [f"base:{tree.name}", "uvicorn"]
    assert all(r["errors"] == 0 and r["per_s"] > 0 and r["api_us"] > 0 for r in rows)
