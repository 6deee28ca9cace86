"""``tally capacity``: the default plan, JSON, ``--from`` a benchmark result, and refusals (exit 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tally.cli import main
from tally.core.model import Event
from tally.store.jetstream.eventlog import encode_run
from tally_dev.capacity.model import ROLES, CapacityError
from tally_dev.capacity.rates import EVENT_BYTES, FEED_ROLES, builtin, from_result


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(["capacity", *argv])
    except SystemExit as exc:  # argparse refuses the command line itself
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def bench_result(**over: Any) -> dict[str, Any]:
    """The shape ``tally bench suite`` writes, with round numbers: 1,000 likes/s for 1 + 5 s."""
    spec = {"warmup_s": 1.0, "duration_s": 5.0, "params": {"feed_size": 50}}
    runs = [
        {"name": "cluster/uniform", "target": "cluster", "preset": "uniform", "mode": "closed",
         "throughput_per_s": 1000.0, "spec": spec, "pg_wal_bytes": 6_000_000, "cpu_wall_s": 7.0,
         "cpu_s": {"api": 3.0, "relay": 0.6, "aggregator": 1.2, "postgres": 2.0, "nats": 0.3,
                   "redis": 0.1}},
        {"name": "cluster/feed", "target": "cluster", "preset": "feed", "mode": "closed",
         "throughput_per_s": 200.0, "spec": spec, "cpu_wall_s": 7.0,
         "cpu_s": {"api": 2.4, "relay": 0.1, "aggregator": 0.1, "postgres": 1.2, "nats": 0.1,
                   "redis": 0.3}},
    ]
    result = {"machine": {"commit": "abc1234", "cores": 2}, "runs": runs,
              "cluster_idle_cpu_per_s": {"api": 0.01, "relay": 0.0, "aggregator": 0.0,
                                         "postgres": 0.0, "nats": 0.0, "redis": 0.0},
              "cluster_tables": {"toggles": {"records": 6000, "bytes_per_record": 230.0},
                                 "counts": {"records": 5000, "bytes_per_record": 90.0}},
              "cluster_redis": {"records": 5000, "bytes_per_record": 110.0}}
    result.update(over)
    return result


def test_defaults_print_a_plan_with_every_source(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys)
    assert (code, err) == (0, "")
    for heading in ("Load", "Per-core throughputs", "Fleet per region", "Storage",
                    "Bandwidth between regions"):
        assert heading in out
    rates = builtin()
    for fig in rates.all_figures().values():
        assert fig.source in out  # every figure is printed with where it comes from


def test_json_is_the_same_plan(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--json", "--regions", "1", "--daily-users", "250M")
    assert code == 0
    doc = orjson.loads(out)
    assert doc["load"]["regions"] == 1 and doc["load"]["daily_users"] == 250e6
    assert doc["traffic"]["likes_per_day"] == 250e6 * 50
    assert {r["name"] for r in doc["roles"]} == set(ROLES)
    assert doc["bandwidth"]["peak_total"] == 0  # one region sends nothing to another


def test_from_a_bench_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "result.json"
    path.write_bytes(orjson.dumps(bench_result()))
    rates = from_result(orjson.loads(path.read_bytes()), str(path))
    # 6,000 likes over 7 s of wall time; the API's 3.0 CPU s less its idle 0.01 x 7 = 2.93 s.
    assert rates.likes_per_core["api"].value == pytest.approx(6000 / (3.0 - 0.07))
    assert rates.likes_per_core["postgres"].value == pytest.approx(6000 / 2.0)
    assert rates.feeds_per_core["redis"].value == pytest.approx(1200 / 0.3)
    assert set(rates.feeds_per_core) == set(FEED_ROLES)
    assert rates.pg_wal_bytes_per_like.value == pytest.approx(1000)
    assert (rates.pg_bytes_per_like.value, rates.pg_bytes_per_count.value,
            rates.redis_bytes_per_counter.value) == (230.0, 90.0, 110.0)
    assert "abc1234" in rates.likes_per_core["api"].source
    assert rates.likes_per_core["api"].run == "cluster/uniform: 6,000 likes / 2.93 CPU s"
    code, out, _ = run(capsys, "--from", str(path))
    assert code == 0 and str(path) in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--items", "-5"], "must not be negative"),
    (["--items", "0"], "items must be > 0"),
    (["--daily-users", "lots"], "not a number: 'lots'"),
    (["--peak-factor", "nan"], "not a finite number"),
    (["--feed-size", "2.5"], "must be a whole number"),
    (["--utilisation", "1.5"], "utilisation is a share"),
    (["--regions", "0"], "regions must be > 0"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--likes-per-day", "1B", "--likes-per-user-per-day", "3"], "not allowed with argument"),
])
def test_bad_inputs_exit_2_naming_the_input(capsys: pytest.CaptureFixture[str], argv: list[str],
                                            message: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert message in err


@pytest.mark.parametrize(("content", "message"), [
    (b"{not json", "is not JSON"),
    (b"[1, 2]", "not a benchmark result"),
    (b'{"runs": []}', "no closed-loop cluster/uniform run with per-role CPU"),
    (orjson.dumps(bench_result(cluster_tables={})), "no cluster_tables.toggles.bytes_per_record"),
    (orjson.dumps(bench_result(cluster_redis={"bytes_per_record": "big"})),
     "no cluster_redis.bytes_per_record"),
])
def test_a_malformed_from_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       content: bytes, message: str) -> None:
    path = tmp_path / "result.json"
    path.write_bytes(content)
    code, out, err = run(capsys, "--from", str(path))
    assert code == 2 and out == ""
    assert message in err


def test_a_missing_from_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--from", str(tmp_path / "absent.json"))
    assert code == 2 and "cannot read" in err


def test_a_run_without_cpu_for_a_role_is_refused() -> None:
    result = bench_result()
    del result["runs"][0]["cpu_s"]["nats"]
    with pytest.raises(CapacityError, match="no CPU time for role 'nats'"):
        from_result(result, "r.json")


def test_event_bytes_match_the_encoder() -> None:
    """The built-in size of an event is what the relay really publishes for a full run."""
    events = [Event(seq=10_000_000_000 + i, counter="like", item=f"post:{31_000_000_000 + i * 7919}",
                    user=str(1_000_000_000_000 + i * 104_729), delta=1,
                    ts=1_765_000_000.123456 + i / 1000, region="eu") for i in range(500)]
    assert len(encode_run("pg12.3", events)) / 500 == pytest.approx(EVENT_BYTES.value, rel=0.05)


def test_event_roles_are_priced_from_the_bulk_run() -> None:
    """Relay, aggregator, NATS and Redis from the bulk run (full batches), API and PostgreSQL
    from one like per request."""
    bulk = {"name": "cluster/bulk", "target": "cluster", "preset": "bulk", "mode": "closed",
            "throughput_per_s": 10.0, "cpu_wall_s": 7.0,
            "spec": {"warmup_s": 1.0, "duration_s": 5.0, "params": {"bulk_size": 250}},
            "cpu_s": {"api": 1.0, "relay": 0.5, "aggregator": 0.25, "postgres": 1.0, "nats": 0.1,
                      "redis": 0.05}}
    result = bench_result()
    result["runs"].append(bulk)
    rates = from_result(result, "r.json")
    # 10 requests/s x 250 likes x 6 s = 15,000 likes.
    assert rates.likes_per_core["relay"].value == pytest.approx(15_000 / 0.5)
    assert rates.likes_per_core["aggregator"].value == pytest.approx(15_000 / 0.25)
    assert rates.likes_per_core["redis"].value == pytest.approx(15_000 / 0.05)
    assert rates.likes_per_core["nats"].run.startswith("cluster/bulk")
    assert rates.likes_per_core["postgres"].value == pytest.approx(6000 / 2.0)  # uniform's
