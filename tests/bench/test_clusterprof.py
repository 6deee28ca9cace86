"""``tally bench cluster-profile`` in its shortest form: the cluster and the naive PostgreSQL peer
driven once each, every per-like figure present and plausible (no timing is asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tally_dev.bench.clusterprof import ProfilePlan, per_like, run, sql_role
from tally_dev.bench.workloads import Params

pytestmark = pytest.mark.slow


def test_statements_are_charged_to_the_role_that_sends_them() -> None:
    assert sql_role("DELETE FROM outbox WHERE source = $1 AND seq <= $2") == "relay"
    assert sql_role("WITH k AS (SELECT ...) INSERT INTO toggles AS t ...") == "api"
    assert sql_role("INSERT INTO watermarks (consumer, source, seq) SELECT ...") == "aggregator"
    assert sql_role("BEGIN") == "other"


def test_costs_are_divided_by_the_likes_answered() -> None:
    before = {"cpu": {"api": 1.0}, "pg_by_app": {"tally-api": 0.5}, "xacts": 10, "wal": 1000,
              "nats_in": 5, "nats_out": 5, "redis_cmds": 0}
    after = {"cpu": {"api": 1.2, "relay": 0.1}, "pg_by_app": {"tally-api": 0.6}, "xacts": 60,
             "wal": 101_000, "nats_in": 55, "nats_out": 105, "redis_cmds": 200}
    cost = per_like(before, after, [("INSERT INTO toggles ...", 20), ("BEGIN", 30)], likes=100)
    assert cost["cpu_us"] == {"api": 2000.0, "relay": 1000.0}
    assert cost["pg_cpu_us_by_role"] == {"api": 1000.0}
    assert (cost["pg_transactions"], cost["pg_wal_bytes"]) == (0.5, 1000)
    assert cost["pg_statements"] == 0.5
    assert cost["pg_statements_by_role"] == {"api": 0.2, "other": 0.3}
    assert (cost["nats_in"], cost["nats_out"], cost["redis_cmds"]) == (0.5, 1.0, 2.0)


@pytest.mark.timeout(240)
def test_a_short_profile_measures_every_role(tmp_path: Path) -> None:
    plan = ProfilePlan(duration_s=1.0, rounds=1, connections=8, presets=("uniform",),
                       params=Params(items=10_000), open_share=0.5)
    result = run(tmp_path / "out", plan, show_progress=False)
    by_target = {r["target"]: r for r in result["runs"] if not r["offered_per_s"]}
    opened = {r["target"]: r for r in result["runs"] if r["offered_per_s"]}
    assert set(opened) == {"cluster", "pg"}  # each at half its own closed-loop maximum
    for name, row in opened.items():
        assert row["offered_per_s"] == pytest.approx(0.5 * by_target[name]["throughput_per_s"],
                                                     abs=0.1)
        assert row["ok"] > 0 and sum(row["cpu_us"].values()) > 0
    assert set(by_target) == {"cluster", "pg"}
    for row in by_target.values():
        assert row["ok"] > 0 and row["errors"] == 0
        assert row["pg_statements"] > 0 and row["pg_wal_bytes"] > 0
    # The peer as a capable engineer writes it: one statement per like, no pool reset query.
    assert by_target["pg"]["pg_statements"] <= 1.1
    cluster = by_target["cluster"]
    assert set(cluster["cpu_us"]) == {"api", "relay", "aggregator", "postgres", "nats", "redis"}
    assert all(v > 0 for k, v in cluster["cpu_us"].items() if k != "redis")
    assert cluster["pg_cpu_us_by_role"]["api"] > 0
    assert cluster["pg_statements_by_role"]["api"] > 0 and cluster["nats_in"] > 0
    md = (tmp_path / "out" / "cluster-profile.md").read_text()
    assert "| uniform | cluster |" in md and "| uniform | pg |" in md
    assert "| 1 | uniform | cluster |" in md and "open loop" in md
