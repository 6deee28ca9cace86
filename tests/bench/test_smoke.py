"""The whole suite in its quick form, and each peer briefly: results are produced and well formed.

Nothing here asserts a timing: a shared 2-core machine cannot promise one. It proves the harness
runs end to end, so it cannot rot between real benchmark runs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import httpx
import orjson
import pytest

from tally_dev.bench import wrk
from tally_dev.bench.hist import PERCENTILES
from tally_dev.bench.peer_engines import PEERS
from tally_dev.bench.suite import COMPARED, QUICK, Suite, peer_target, run_suite
from tally_dev.engines import HOST
from tests.engines import require

pytestmark = pytest.mark.slow


def _well_formed(run: dict[str, object]) -> None:
    assert isinstance(run["ok"], int) and run["ok"] > 0
    assert run["errors"] == 0, run["error_reasons"]
    latency = run["latency"]
    assert isinstance(latency, dict)
    for p in PERCENTILES:
        assert f"p{p:g}_ms" in latency
    assert isinstance(run["series"], list) and run["series"]


@pytest.mark.timeout(300)  # a dozen short runs, each spawning its load generator process
def test_quick_suite_writes_results(tmp_path: Path) -> None:
    result = run_suite(tmp_path / "out", QUICK, show_progress=False)
    stored = orjson.loads((tmp_path / "out" / "result.json").read_bytes())
    assert {r["name"] for r in stored["runs"]} == {r["name"] for r in result["runs"]}
    presets = {r["preset"] for r in result["runs"] if r["target"] == "tally"}
    assert presets >= {"uniform", "zipf", "viral", "bulk", "feed", "mixed", "incr", "counts"}
    assert any(r["mode"] == "open" for r in result["runs"])
    for run in result["runs"]:
        _well_formed(run)
    assert result["checks"] and all("met" in c for c in result["checks"])
    assert result["memory"]["bytes_per_cached_counter"] > 0
    assert result["sqlite_storage"]["records"] > 0
    md = (tmp_path / "out" / "results.md").read_text()
    assert "## Targets" in md and "tally/uniform" in md
    for png in result["plots"]:
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"


def _feed_answers_counts_and_likes(url: str) -> None:
    """The one-request feed of a lean peer: its counts and the viewer's likes, as Tally answers."""
    with httpx.Client(base_url=url) as c:
        for user in ("feed-a", "feed-a", "feed-b"):
            c.post("/v1/like", json={"user_id": user, "item_type": "post", "item_id": "f1"})
        refs = [{"item_type": "post", "item_id": i} for i in ("f1", "f2")]
        got = c.post("/v1/counts", json={"items": refs, "user_id": "feed-a"}).json()["results"]
        assert [(r["counts"], r["has"]) for r in got] == [({"like": 2}, {"like": True}),
                                                           ({"like": 0}, {"like": False})]
        plain = c.post("/v1/counts", json={"items": refs}).json()["results"]
        assert [r["counts"] for r in plain] == [{"like": 2}, {"like": 0}]
        assert "has" not in plain[0]


@pytest.mark.integration
@pytest.mark.parametrize("peer", PEERS)
def test_peer_serves_the_workloads(engines_dir: Path, peer: str) -> None:
    """Each lean peer serves every compared workload, measured by both generators."""
    if peer != "bare":
        require("postgres" if peer == "pg" else "redis")
    work = engines_dir / f"bench-{peer}"  # reachable by PostgreSQL's unprivileged user
    work.mkdir()
    work.chmod(0o711)
    suite = Suite(replace(QUICK, peers=(peer,), wrk=wrk.available()), work, show_progress=False)
    with peer_target(work, peer) as (srv, probe):
        for preset in COMPARED:
            suite.measure(peer, srv.port, preset)
            suite.confirm(peer, srv.port, preset, duration_s=1.0)
        storage = probe() if probe is not None else None
        if peer != "bare":
            _feed_answers_counts_and_likes(f"http://{HOST}:{srv.port}")
    assert [r["preset"] for r in suite.runs if r["tool"] == "loadgen"] == list(COMPARED)
    for run in suite.runs:
        assert run["errors"] == 0, run["error_reasons"]
        assert run["ok"] > 0 and run["latency"]["p99_ms"] > 0
    if wrk.available():
        assert [r["preset"] for r in suite.runs if r["tool"] == "wrk"] == list(COMPARED)
    if storage is not None:
        assert storage["records"] > 0 and storage["bytes_per_record"] > 0
