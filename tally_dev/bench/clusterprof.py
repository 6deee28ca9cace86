"""``tally bench cluster-profile``: where one like's cost goes in the cluster, beside naive PostgreSQL.

The cluster at its smallest (one API, relay and aggregator; one PostgreSQL, NATS and Redis: the
suite's layout) and the naive PostgreSQL peer (a lean granian server, one transaction per like)
are up at once and driven in interleaved rounds by the suite's closed-loop generator. Each run
records, per like answered:

- CPU per role: each process tree's CPU (``cpu.tree_cpu_s``, from /proc: the same counters
  ``getrusage`` reads), from the load's start until the event log has caught up, so the relay
  and aggregator are charged for the events of this run. PostgreSQL's CPU is also split by the
  role its backends serve (``application_name`` = ``tally-<role>``).
- Round trips: PostgreSQL statements (``pg_stat_statements``, top level, BEGIN and COMMIT
  included), transactions committed and WAL bytes; NATS messages in and out (the server's
  ``/varz``); Redis commands (``INFO stats``).

Why CPU per like and not only throughput: on a shared two-core machine throughput moves with
everything else running; CPU per operation moves far less (docs/performance.md). The ratio to the
peer's throughput is still quoted, from the same round.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import redis

from tally_dev.bench import cpu, loadgen, targets
from tally_dev.bench.loadgen import RunSpec
from tally_dev.bench.report import machine, run_dict
from tally_dev.bench.workloads import Params
from tally_dev.cluster import DevCluster, Layout
from tally_dev.engines import HOST, EngineError, NatsEngine, PostgresEngine

STATS = {"shared_preload_libraries": "'pg_stat_statements'", "pg_stat_statements.track": "top",
         "pg_stat_statements.max": "1000"}
# Which role sends a statement, by what it touches (pg_stat_statements does not keep the
# application name). Checked in order; the first match names the role.
_ROLE_OF_SQL = (
    ("relay", re.compile(r"FROM outbox WHERE source|DELETE FROM outbox\b")),
    ("leases", re.compile(r"\blease", re.I)),
    ("aggregator", re.compile(r"watermarks|consumers|intents|rollups|INSERT INTO counts|"
                              r"UPDATE counts|applied_intents")),
    ("api", re.compile(r"toggles|outbox|idempotency|FROM counts")),
)


@dataclass(frozen=True)
class ProfilePlan:
    duration_s: float = 6.0
    rounds: int = 2
    connections: int = 32
    presets: tuple[str, ...] = ("uniform", "viral")
    params: Params = Params()
    # Another checkout of Tally (e.g. ``git worktree add /tmp/base <commit>``) run as a second
    # cluster, "cluster-base", in the same rounds: a change's before and after side by side.
    baseline: Path | None = None
    # After each system's closed-loop run of a round, an open-loop run at this share of the
    # maximum it just reached (0: none): latency and cost per like at the targets' load, where
    # requests arrive spread out instead of in the closed loop's waves.
    open_share: float = 0.0


def sql_role(query: str) -> str:
    for role, pattern in _ROLE_OF_SQL:
        if pattern.search(query):
            return role
    return "other"


def _proc_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return sum(int(f) for f in fields[11:13]) / cpu._TICK  # utime, stime


class Probe:
    """Counters of one system under test (the cluster, or the peer), read before and after."""

    def __init__(self, roots: dict[str, int], pgs: list[tuple[PostgresEngine, str]],
                 nats: NatsEngine | None = None, redis_url: str | None = None) -> None:
        self.roots = roots
        self.pgs = pgs
        self.nats = nats
        self.redis_url = redis_url

    def reset_statements(self) -> None:
        for engine, db in self.pgs:
            engine.psql("SELECT pg_stat_statements_reset()", database=db)

    def snapshot(self) -> dict[str, Any]:
        snap: dict[str, Any] = {"cpu": cpu.tree_cpu_s(self.roots), "pg_by_app": {},
                                "xacts": 0, "wal": 0}
        by_app: dict[str, float] = defaultdict(float)
        for engine, db in self.pgs:
            rows = engine.psql("SELECT pid, application_name FROM pg_stat_activity "
                               "WHERE backend_type = 'client backend'", database=db)
            for line in rows.splitlines():
                pid, _, app = line.partition("|")
                by_app[app or "other"] += _proc_cpu_s(int(pid))
            x, w = engine.psql(f"SELECT xact_commit, pg_current_wal_lsn() - '0/0' FROM "
                               f"pg_stat_database WHERE datname = '{db}'",
                               database=db).strip().split("|")
            snap["xacts"] += int(x)
            snap["wal"] += int(float(w))
        snap["pg_by_app"] = dict(by_app)
        if self.nats is not None:
            varz = httpx.get(f"http://{HOST}:{self.nats.monitor_port}/varz", timeout=5).json()
            snap["nats_in"], snap["nats_out"] = varz["in_msgs"], varz["out_msgs"]
        if self.redis_url is not None:
            with redis.Redis.from_url(self.redis_url) as r:
                snap["redis_cmds"] = int(r.info("stats")["total_commands_processed"])
        return snap

    def statements(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        for engine, db in self.pgs:
            rows = engine.psql("SELECT calls, regexp_replace(query, '\\s+', ' ', 'g') FROM "
                               "pg_stat_statements WHERE query NOT LIKE '%pg_stat%' "
                               "ORDER BY calls DESC", database=db)
            for line in rows.splitlines():
                calls, _, query = line.partition("|")
                out.append((query, int(calls)))
        return out


def per_like(before: dict[str, Any], after: dict[str, Any], statements: list[tuple[str, int]],
             likes: int) -> dict[str, Any]:
    """What one like cost, from two snapshots and the statements run between them."""
    n = max(likes, 1)
    out: dict[str, Any] = {
        "cpu_us": {role: round((after["cpu"][role] - before["cpu"].get(role, 0.0)) / n * 1e6, 1)
                   for role in after["cpu"]},
        "pg_cpu_us_by_role": {
            app.removeprefix("tally-"): round((s - before["pg_by_app"].get(app, 0.0)) / n * 1e6, 1)
            for app, s in after["pg_by_app"].items()},
        "pg_transactions": round((after["xacts"] - before["xacts"]) / n, 3),
        "pg_wal_bytes": round((after["wal"] - before["wal"]) / n),
    }
    by_role: dict[str, int] = defaultdict(int)
    for query, calls in statements:
        by_role[sql_role(query)] += calls
    out["pg_statements"] = round(sum(c for _, c in statements) / n, 3)
    out["pg_statements_by_role"] = {r: round(c / n, 3) for r, c in sorted(by_role.items())}
    out["pg_top_statements"] = [{"calls_per_like": round(c / n, 3), "role": sql_role(q),
                                 "sql": q[:140]} for q, c in statements[:12]]
    for key in ("nats_in", "nats_out", "redis_cmds"):
        if key in after:
            out[key] = round((after[key] - before[key]) / n, 3)
    return out


class Profiler:
    def __init__(self, plan: ProfilePlan, work: Path, show_progress: bool = True) -> None:
        self.plan = plan
        self.work = work
        self.show_progress = show_progress
        self.runs: list[dict[str, Any]] = []

    def measure(self, target: str, port: int, probe: Probe, preset: str, rnd: int,
                settle: DevCluster | None, rate: float = 0.0) -> dict[str, Any]:
        """A closed-loop run, or with ``rate`` an open-loop one offering that many likes/s."""
        p = self.plan
        if settle is not None:
            _settle(settle)
        probe.reset_statements()
        before = probe.snapshot()
        name = f"{target}/{preset}" + (f"@{rate:.0f}" if rate else "") + f" r{rnd + 1}"
        spec = RunSpec(name=name, host=HOST, port=port, preset=preset,
                       mode="open" if rate else "closed", rate=rate,
                       duration_s=p.duration_s, warmup_s=0.0, connections=p.connections,
                       seed=rnd + 1, params=p.params, run_id=len(self.runs) + 1)
        result = run_dict(loadgen.run(spec, self.show_progress))
        if settle is not None:
            _settle(settle)  # the relay and aggregator finish this run's events: charged to it
        cost = per_like(before, probe.snapshot(), probe.statements(), result["ok"])
        row = {"target": target, "preset": preset, "round": rnd, "offered_per_s": rate or None,
               "throughput_per_s": result["throughput_per_s"], "ok": result["ok"],
               "errors": result["errors"], "p50_ms": result["latency"]["p50_ms"],
               "p99_ms": result["latency"]["p99_ms"], **cost}
        self.runs.append(row)
        if self.show_progress:
            total = sum(cost["cpu_us"].values())
            print(f"  {spec.name:<24} {row['throughput_per_s']:>7,.0f}/s  p99 {row['p99_ms']:.1f} ms"
                  f"  CPU {total:,.0f} us/like  PG statements {cost['pg_statements']:.2f}/like",
                  file=sys.stderr)
        return row

    def run(self) -> dict[str, Any]:
        started, load_before = time.time(), os.getloadavg()
        with contextlib.ExitStack() as stack:
            clusters = {"cluster": stack.enter_context(_cluster(self.work / "cluster"))}
            if self.plan.baseline is not None:
                clusters["cluster-base"] = stack.enter_context(
                    _cluster(self.work / "cluster-base", self.plan.baseline))
            peer_port, peer_probe = stack.enter_context(_pg_peer(self.work))
            systems: dict[str, tuple[DevCluster | None, int, Probe]] = {
                **clusters, "pg": (None, peer_port, peer_probe)}
            share = self.plan.open_share
            for rnd in range(self.plan.rounds):
                for preset in self.plan.presets:
                    for name, (cluster, port, probe) in systems.items():
                        top = self.measure(name, port, probe, preset, rnd, cluster)
                        if share > 0 and top["throughput_per_s"] > 0:
                            self.measure(name, port, probe, preset, rnd, cluster,
                                         rate=round(share * top["throughput_per_s"], 1))
        return {"machine": machine(), "command": " ".join(sys.argv), "started": started,
                "wall_s": round(time.time() - started, 1),
                "load_average": {"before": load_before, "after": os.getloadavg()},
                "plan": {"duration_s": self.plan.duration_s, "rounds": self.plan.rounds,
                         "connections": self.plan.connections, "open_share": self.plan.open_share,
                         "baseline": str(self.plan.baseline or "")},
                "runs": self.runs}


@contextlib.contextmanager
def _cluster(root: Path, code: Path | None = None) -> Iterator[tuple[DevCluster, int, Probe]]:
    """The suite's smallest cluster, running this checkout's code or ``code``'s."""
    layout = Layout(apis=1, relays=1, aggregators=1, partitions=4, databases=1)
    env = {"PYTHONPATH": str(code.resolve())} if code is not None else None
    cluster = DevCluster(root, layout, settings={"log_level": "WARNING"}, pg_settings=STATS,
                         process_env=env)
    try:
        cluster.up()
        groups = {row["name"]: row["pid"] for row in cluster.status()}
        pgs = [(e, "tally") for e in cluster.engines.values() if isinstance(e, PostgresEngine)]
        for engine, db in pgs:
            engine.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements", database=db)
        nats = cluster.engines["nats"]
        assert isinstance(nats, NatsEngine)
        port = urlsplit(cluster.urls("api")[0]).port or 80
        yield cluster, port, Probe(groups, pgs, nats, cluster.engines["redis"].url)
    finally:
        cluster.down()


@contextlib.contextmanager
def _pg_peer(work: Path) -> Iterator[tuple[int, Probe]]:
    engine = PostgresEngine(work / "engine-pg", settings=STATS)
    with engine:
        engine.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        with targets.peer_server(work, "pg", "pg", engine.dsn()) as srv:
            assert srv.proc is not None and engine.proc is not None
            yield srv.port, Probe({"server": srv.proc.pid, "postgres": engine.proc.pid},
                                  [(engine, "postgres")])


def _settle(cluster: DevCluster, timeout_s: float = 30.0) -> None:
    if not cluster.settled(timeout_s):
        raise EngineError(f"the cluster's event log did not catch up in {timeout_s:.0f} s")


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def markdown(result: dict[str, Any]) -> str:
    """The profile table (medians over rounds), the side-by-side ratio of each round and, with
    open-loop runs, each one beside the closed-loop run it took its rate from."""
    every = result["runs"]
    runs = [r for r in every if not r.get("offered_per_s")]
    lines = ["| workload | system | likes/s (p99) | CPU us per like by role | PostgreSQL CPU us "
             "per like by role served | PG statements / transactions / WAL bytes per like | "
             "NATS msgs in+out, Redis commands per like |", "|---|---|---:|---|---|---|---|"]
    for preset in dict.fromkeys(r["preset"] for r in runs):
        for target in ("cluster-base", "cluster", "pg"):
            rows = [r for r in runs if r["preset"] == preset and r["target"] == target]
            if not rows:
                continue
            roles = dict.fromkeys(k for r in rows for k in r["cpu_us"])
            cpu_us = {k: _median([r["cpu_us"].get(k, 0.0) for r in rows]) for k in roles}
            apps = dict.fromkeys(k for r in rows for k in r["pg_cpu_us_by_role"])
            pg_us = {k: _median([r["pg_cpu_us_by_role"].get(k, 0.0) for r in rows]) for k in apps}
            med = {k: _median([r[k] for r in rows]) for k in ("throughput_per_s", "p99_ms",
                                                            "pg_statements", "pg_transactions",
                                                            "pg_wal_bytes")}
            stm = {k: _median([r["pg_statements_by_role"].get(k, 0.0) for r in rows])
                   for k in dict.fromkeys(k for r in rows for k in r["pg_statements_by_role"])}
            msgs = ""
            if "nats_in" in rows[0]:
                msgs = (f"{_median([r['nats_in'] + r['nats_out'] for r in rows]):.3f}, "
                        f"{_median([r['redis_cmds'] for r in rows]):.3f}")
            lines.append(
                f"| {preset} | {target} | {med['throughput_per_s']:,.0f} ({med['p99_ms']:.0f} ms) | "
                f"total **{sum(cpu_us.values()):,.0f}**: "
                + ", ".join(f"{k} {v:,.0f}" for k, v in cpu_us.items()) + " | "
                + ", ".join(f"{k} {v:,.0f}" for k, v in pg_us.items() if v) + " | "
                f"{med['pg_statements']:.2f} ("
                + ", ".join(f"{k} {v:.2f}" for k, v in stm.items()) + ") / "
                f"{med['pg_transactions']:.2f} / {med['pg_wal_bytes']:,.0f} | {msgs} |")
    lines += ["", "| round | workload | system | likes/s | naive PostgreSQL likes/s | ratio |",
              "|---|---|---|---:|---:|---:|"]
    for r in runs:
        if not r["target"].startswith("cluster"):
            continue
        peer = next((p for p in runs if p["target"] == "pg" and p["preset"] == r["preset"]
                     and p["round"] == r["round"]), None)
        if peer and peer["throughput_per_s"]:
            lines.append(f"| {r['round'] + 1} | {r['preset']} | {r['target']} | "
                         f"{r['throughput_per_s']:,.0f} | "
                         f"{peer['throughput_per_s']:,.0f} | "
                         f"{r['throughput_per_s'] / peer['throughput_per_s']:.2f}x |")
    return "\n".join(lines + _open_lines(every)) + "\n"


def _open_lines(runs: list[dict[str, Any]]) -> list[str]:
    """Each open-loop run after the closed-loop run of the same system, preset and round."""
    opened = [r for r in runs if r.get("offered_per_s")]
    if not opened:
        return []
    lines = ["", "| round | workload | system | closed loop: likes/s, p99, CPU us/like | "
             "open loop: offered/s, served/s, p50 / p99 ms | open loop CPU us per like by role |",
             "|---|---|---|---|---|---|"]
    for r in opened:
        top = next(c for c in runs if not c.get("offered_per_s") and c["target"] == r["target"]
                   and c["preset"] == r["preset"] and c["round"] == r["round"])
        lines.append(
            f"| {r['round'] + 1} | {r['preset']} | {r['target']} | "
            f"{top['throughput_per_s']:,.0f}, {top['p99_ms']:.0f} ms, "
            f"{sum(top['cpu_us'].values()):,.0f} | {r['offered_per_s']:,.0f}, "
            f"{r['throughput_per_s']:,.0f}, {r['p50_ms']:.1f} / {r['p99_ms']:.1f} | "
            f"total **{sum(r['cpu_us'].values()):,.0f}**: "
            + ", ".join(f"{k} {v:,.0f}" for k, v in r["cpu_us"].items()) + " |")
    return lines


def run(out: Path, plan: ProfilePlan, show_progress: bool = True) -> dict[str, Any]:
    """Runs the profile; writes ``cluster-profile.json`` and ``cluster-profile.md`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tally-clusterprof-"))
    os.chmod(work, 0o755)  # PostgreSQL runs as an unprivileged user and must reach its directory
    here = Path.cwd()
    os.chdir(work)  # the processes' sys.path[0]: not a checkout, or it would shadow --baseline
    try:
        result = Profiler(plan, work, show_progress).run()
    finally:
        os.chdir(here)
    shutil.rmtree(work, ignore_errors=True)
    (out / "cluster-profile.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    (out / "cluster-profile.md").write_text(markdown(result))
    return result

