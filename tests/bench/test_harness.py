"""The harness's parts: workloads are deterministic, HTTP framing is parsed, histograms merge."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from tally_dev.bench import loadgen
from tally_dev.bench.hist import Recorder
from tally_dev.bench.http1 import Http1Connection
from tally_dev.bench.loadgen import RunSpec
from tally_dev.bench.report import run_dict
from tally_dev.bench.suite import open_pool
from tally_dev.bench.workloads import PRESETS, Generator, Params, Zipf


def _bodies(preset: str, seed: int, n: int = 50) -> list[bytes]:
    gen = Generator(preset, Params(items=1000), seed, worker=0)
    return [b"".join(gen.next()[1]) for _ in range(n)]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_are_seeded(preset: str) -> None:
    assert _bodies(preset, 3) == _bodies(preset, 3)
    assert _bodies(preset, 3) != _bodies(preset, 4)


def test_viral_share_and_zipf_range() -> None:
    gen = Generator("viral", Params(items=1000, viral_share=0.4), seed=1, worker=0)
    items = [orjson.loads(gen.next()[1][0].split(b"\r\n\r\n", 1)[1])["item_id"] for _ in range(4000)]
    assert 0.35 < items.count(1) / len(items) < 0.45
    import random

    z = Zipf(10_000, 1.0, random.Random(1))
    draws = [z.draw() for _ in range(20_000)]
    assert min(draws) >= 1 and max(draws) <= 10_000
    assert draws.count(1) > draws.count(100) * 10  # popularity falls as 1/k


def test_recorder_round_trip_and_merge() -> None:
    a, b = Recorder(), Recorder()
    a.ok("like", 0, 0.002)
    b.ok("like", 1, 0.004)
    b.error("http 503", 1)
    a.waited(0.001)
    b.waited(0.300)
    merged = Recorder.decode(a.encode())
    merged.merge(Recorder.decode(b.encode()))
    assert merged.completed() == 2
    assert merged.errors == {"http 503": 1}
    assert sorted(merged.seconds) == [0, 1]
    assert merged.waits.get_total_count() == 2
    assert merged.waits.get_max_value() >= 299_000


class _SlowServer(asyncio.Protocol):
    """Answers each request 20 ms after it arrives: a pool of n connections carries at most
    n / 0.02 requests a second."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for _ in range(data.count(b"\r\n\r\n")):  # the generator's bodies hold no blank line
            asyncio.get_running_loop().call_later(0.02, self.transport.write,  # type: ignore[attr-defined]
                                                  b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")


def test_the_open_loop_records_how_long_requests_waited_for_a_connection() -> None:
    """A pool too small for the rate queues requests in the generator, and the run says so: the
    wait for a free connection is most of the latency. A pool large enough barely waits."""
    import threading

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(_SlowServer, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        def open_loop(connections: int) -> dict[str, Any]:
            spec = RunSpec(name=f"open-{connections}", host="127.0.0.1", port=port,
                           preset="uniform", mode="open", rate=300, duration_s=1.0,
                           warmup_s=0.2, connections=connections, grace_s=2.0)
            return run_dict(loadgen.run(spec, show_progress=False))

        small, large = open_loop(2), open_loop(30)  # carry 100/s and 1,500/s
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()
    assert small["generator_wait"]["p99_ms"] > 100
    assert small["generator_wait"]["p99_ms"] > 0.5 * small["latency"]["p99_ms"]
    assert large["generator_wait"]["p99_ms"] < 0.5 * small["generator_wait"]["p99_ms"]
    assert large["errors"] == 0


class _Feed(Http1Connection):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []


@pytest.mark.anyio
@pytest.mark.parametrize("chunks", [
    [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"],
    [b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n", b"\r\nhel", b"lo"],
    [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n", b"0\r\n\r\n"],
])
async def test_http1_framing(chunks: list[bytes]) -> None:
    conn = _Feed()

    class _Transport:
        def write(self, data: bytes) -> None:
            conn.sent.append(data)

    conn.transport = _Transport()  # type: ignore[assignment]
    task = asyncio.ensure_future(conn.request(b"GET / HTTP/1.1\r\n\r\n"))
    await asyncio.sleep(0)
    for c in chunks:
        conn.data_received(c)
    status = await task
    assert status in (200, 201)
    assert not conn._buf  # the whole response was consumed


def test_runs_like_with_fresh_users() -> None:
    """A second run against the same server must send new likes, not replay the first run's."""
    def users(run_id: int) -> set[int]:
        gen = Generator("uniform", Params(items=1000), seed=1, worker=0, run_id=run_id)
        return {orjson.loads(gen.next()[1][0].split(b"\r\n\r\n", 1)[1])["user_id"] for _ in range(100)}

    assert not users(1) & users(2)
    assert len(users(1)) == 100


def test_server_stats_keep_full_collections_per_run() -> None:
    from tally_dev.bench.server_stats import delta

    full = 'tally_gc_pause_seconds_count{generation="2"}'
    paused = 'tally_gc_pause_seconds_sum{generation="2"}'
    before = {"tally_write_commits_total": 10.0, "tally_write_ops_committed_total": 100.0,
              "tally_write_syncs_total": 8.0, full: 1.0, paused: 0.25}
    after = {"tally_write_commits_total": 14.0, "tally_write_ops_committed_total": 300.0,
             "tally_write_syncs_total": 10.0, full: 3.0, paused: 0.65}
    d = delta(before, after)
    assert d["write_commits"] == 4 and d["ops_per_commit"] == 50.0
    assert d["write_syncs"] == 2 and d["commits_per_sync"] == 2.0
    assert d["gc_full_collections"] == 2 and d["gc_full_pause_s"] == 0.4


def test_maxima_are_medians_of_the_rounds_and_the_p99_check_takes_the_run_nearest_70() -> None:
    from tally_dev.bench.checks import checks, median_max

    def run(preset: str, per_s: float, mode: str = "closed", round_: int | None = None,
            p99: float = 1.0, tool: str = "loadgen") -> dict[str, Any]:
        return {"target": "tally", "preset": preset, "mode": mode, "round": round_, "tool": tool,
                "throughput_per_s": per_s, "offered_per_s": per_s if mode == "open" else None,
                "errors": 0, "latency": {"p99_ms": p99}}

    runs = [run("feed", 900, round_=0), run("feed", 1000, round_=1), run("feed", 1100, round_=2),
            run("feed", 600), run("feed", 5000, round_=0, tool="wrk"),
            run("feed", 400, "open", p99=30.0), run("feed", 690, "open", p99=4.0),
            run("feed", 900, "open", p99=80.0), run("bulk", 80)]
    assert median_max(runs, "tally", "feed") == 1000  # the lone run outside the rounds: not in it
    assert median_max(runs, "tally", "feed", "wrk") == 5000  # each generator on its own
    assert median_max(runs, "tally", "bulk") == 80  # no rounds at all: the lone run
    (feed,) = [c for c in checks(runs, {}) if c["target"].startswith("tally feed")]
    # the maximum just before the open-loop run (600/s, outside the rounds) sets the 70%
    assert not feed["met"] and "p99 30.0 ms at 400/s offered (67% of 600/s)" in feed["measured"]
    rounds_only = [r for r in runs if r["mode"] == "open" or r["round"] is not None]
    (feed,) = [c for c in checks(rounds_only, {}) if c["target"].startswith("tally feed")]
    assert feed["met"] and "p99 4.0 ms at 690/s offered (69% of 1,000/s)" in feed["measured"]


def test_the_sustained_rate_is_the_highest_step_served_in_full_within_the_bound() -> None:
    from tally_dev.bench.checks import sustained

    def step(rate: float, p99: float, served: float = 1.0, errors: int = 0) -> dict[str, Any]:
        return {"target": "tally", "preset": "bulk", "mode": "open", "offered_per_s": rate,
                "throughput_per_s": rate * served, "errors": errors, "latency": {"p99_ms": p99}}

    steps = [step(90, 30.0), step(70, 20.0), step(80, 49.0), step(100, 51.0), step(110, 60.0)]
    assert sustained(steps, "tally", "bulk", 50.0) == 90  # 100 and 110: p99 over the bound
    assert sustained([step(70, 60.0), step(80, 30.0)], "tally", "bulk", 50.0) == 80
    assert sustained([step(70, 20.0), step(80, 30.0, served=0.9)], "tally", "bulk", 50.0) == 70
    assert sustained([step(70, 20.0), step(80, 30.0, errors=1)], "tally", "bulk", 50.0) == 70
    assert sustained([], "tally", "bulk", 50.0) == 0


def test_settle_waits_for_the_aggregator_to_catch_up() -> None:
    """A server whose lag falls to zero on the third scrape: settle polls until then; one that
    never catches up is left after the timeout, and the wait is reported either way."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tally_dev.bench.server_stats import settle

    lags = iter([5000.0, 120.0])
    scrapes: list[float] = []

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            lag = next(lags, 0.0) if self.server is caught_up else 7.0
            scrapes.append(lag)
            body = f"tally_aggregator_lag_events {lag}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    caught_up = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    behind = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    for srv in (caught_up, behind):
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        waited = settle(f"http://127.0.0.1:{caught_up.server_port}", timeout_s=10, poll_s=0.01)
        assert scrapes == [5000.0, 120.0, 0.0] and waited < 10
        scrapes.clear()
        waited = settle(f"http://127.0.0.1:{behind.server_port}", timeout_s=0.2, poll_s=0.01)
        assert waited >= 0.2 and scrapes and set(scrapes) == {7.0}
    finally:
        for srv in (caught_up, behind):
            srv.shutdown()
            srv.server_close()


def test_the_bulk_check_quotes_the_lowest_step_when_none_met_the_bound() -> None:
    from tally_dev.bench.checks import checks

    def run(target: str, preset: str, per_s: float, mode: str = "closed", p99: float = 1.0,
            size: int = 250) -> dict[str, Any]:
        return {"target": target, "preset": preset, "mode": mode, "round": None, "tool": "loadgen",
                "throughput_per_s": per_s, "offered_per_s": per_s if mode == "open" else None,
                "errors": 0, "latency": {"p50_ms": 10.0, "p99_ms": p99},
                "spec": {"params": {"bulk_size": size}}}

    runs = [run("pg", "viral", 4000), run("tally", "bulk", 180),
            run("tally", "bulk", 108, "open", p99=90.0), run("tally", "bulk", 90, "open", p99=68.0)]
    (bulk,) = [c for c in checks(runs, {}) if c["target"].startswith("viral via /v1/bulk")]
    assert not bulk["met"]
    assert ("Tally sustains 0 likes/s at p99 <= 50 ms in requests of 250 (the lowest step, "
            "22,500 likes/s offered: p50 10.0 ms, p99 68.0 ms, 22,500/s served, 0 errors)"
            in bulk["measured"])
    runs.append(run("tally", "bulk", 72, "open", p99=30.0))
    (bulk,) = [c for c in checks(runs, {}) if c["target"].startswith("viral via /v1/bulk")]
    assert bulk["measured"].startswith("Tally sustains 18,000 likes/s at p99 <= 50 ms in "
                                       "requests of 250; PostgreSQL viral 4,000/s: 4.5x")


def test_the_suite_keeps_tallys_server_logs(tmp_path: Path) -> None:
    from tally_dev.bench.suite import keep_tally_logs

    work, out = tmp_path / "work", tmp_path / "out"
    for name in ("tally", "tally-2p", "pg"):
        (work / name).mkdir(parents=True)
        (work / name / f"{name}.log").write_text(f'{{"msg":"slow commit","from":"{name}"}}\n')
    kept = keep_tally_logs(work, out)
    assert sorted(p.name for p in kept) == ["tally-2p-tally-2p.log", "tally-tally.log"]  # not pg
    assert (out / "logs" / "tally-tally.log").read_text().startswith('{"msg":"slow commit"')


def test_each_servers_maxima_are_measured_at_the_connections_its_probe_served_best(
        tmp_path: Path) -> None:
    """The probe runs every server at every count and keeps the best per workload; the rounds
    (both generators) then run at that count, and probes never count as a maximum."""
    from dataclasses import replace

    from tally_dev.bench.checks import median_max
    from tally_dev.bench.suite import COMPARED, QUICK, Suite
    from tally_dev.bench.summary import probe_table, side_by_side_table

    best = {"tally": 128, "peer": 32}
    suite = Suite(replace(QUICK, rounds=2, compare_connections=(32, 64, 128)), tmp_path,
                  show_progress=False)
    confirmed: list[tuple[str, int | None]] = []

    def measure(target: str, port: int, preset: str, mode: str = "closed", rate: float = 0.0,
                round_: int | None = None, tool: str = "loadgen", suffix: str = "",
                **over: Any) -> dict[str, Any]:
        n = over["connections"]
        run = {"target": target, "preset": preset, "mode": mode, "round": round_, "tool": tool,
               "throughput_per_s": 1000.0 - abs(n - best[target]), "offered_per_s": None,
               "errors": 0, "latency": {"p99_ms": 1.0}, "spec": {"connections": n},
               "name": f"{target}/{preset}{suffix}"}
        suite.runs.append(run)
        return run

    suite.measure = measure  # type: ignore[method-assign]
    suite.confirm = lambda target, port, preset, rnd=None, d=None, n=None: (  # type: ignore
        confirmed.append((target, n)))
    suite.compare({"tally": 1, "peer": 2})
    assert suite.connections == {t: {p: best[t] for p in COMPARED} for t in best}
    rounds = [r for r in suite.runs if r["tool"] == "loadgen"]
    assert len(rounds) == 2 * len(COMPARED) * 2
    assert all(r["spec"]["connections"] == best[r["target"]] for r in rounds)
    assert set(confirmed) == {("tally", 128), ("peer", 32)}
    assert median_max(suite.runs, "tally", "uniform") == 1000  # the rounds' runs, not the probes'
    assert "@128" in side_by_side_table(suite.runs, suite.connections)
    assert "| tally | uniform | 904 | 936 | **1,000** |" in probe_table(suite.runs)


def test_a_ratio_target_is_met_only_where_wrk_confirms_it() -> None:
    from tally_dev.bench.checks import checks

    def run(target: str, preset: str, per_s: float, tool: str) -> dict[str, Any]:
        return {"target": target, "preset": preset, "mode": "closed", "round": 0, "tool": tool,
                "throughput_per_s": per_s, "offered_per_s": None, "errors": 0,
                "latency": {"p99_ms": 1.0}}

    def viral(tally_by_wrk: float | None) -> dict[str, Any]:
        runs = [run("tally", "viral", 1600, "loadgen"), run("redis-always", "viral", 1000, "loadgen")]
        if tally_by_wrk is not None:
            runs += [run("tally", "viral", tally_by_wrk, "wrk"),
                     run("redis-always", "viral", 1000, "wrk")]
        (found,) = [c for c in checks(runs, {}) if c["target"].startswith("viral likes")]
        return found

    assert viral(None)["met"]  # wrk not measured: the suite's generator alone
    assert viral(1550)["met"] and "1.60x; wrk 1.55x" in viral(1550)["measured"]
    assert not viral(1400)["met"]  # 1.6x by one generator, 1.4x by the other: not met


def test_an_open_loop_pool_carries_its_rate_at_the_latency_bound() -> None:
    """Enough connections that a server answering within the bound never makes the generator
    wait, and never fewer than the closed-loop maximum was measured with."""
    assert open_pool(4_000, 64) == 200  # 4,000/s x 50 ms in flight
    assert open_pool(500, 64) == 64
    assert open_pool(4_001, 64) == 201
