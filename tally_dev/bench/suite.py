"""The benchmark suite behind ``make bench``: Tally, lean peers and a bare server, in one run.

Order: both generators' ceilings (the null server); then Tally embedded, the bare lean server and
the lean peers all up at once, measured in interleaved rounds by the suite's generator and by wrk;
Tally's open-loop runs and its other workloads; the cluster last. Every ratio in the result
compares figures measured in this run on this machine.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from tally.batching import BATCHER_IN_FLIGHT
from tally_dev.bench import cpu, loadgen, memory, server_stats, targets, wrk
from tally_dev.bench.checks import median_max
from tally_dev.bench.loadgen import RunSpec
from tally_dev.bench.peer_engines import PEERS
from tally_dev.bench.report import machine, run_dict
from tally_dev.bench.workloads import Params
from tally_dev.cluster import DevCluster
from tally_dev.engines import HOST, EngineError, PostgresEngine


@dataclass(frozen=True)
class SuitePlan:
    duration_s: float = 8.0
    warmup_s: float = 1.0
    connections: int = 32
    workers: int = 1
    seed: int = 1
    # Open-loop rates as fractions of the closed-loop maximum; 0.7 is the targets' load.
    sweep: tuple[float, ...] = (0.4, 0.7, 0.9)
    # Bulk from 30%: a batching client's p99 holds its bound further below the maximum than
    # single likes do (a request of 250 waits for a whole group commit, and for any stop of the
    # likes writer), and a sweep whose lowest step misses the bound reports no sustained rate.
    bulk_sweep: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    rounds: int = 3  # interleaved rounds of the side-by-side maxima; the tables take the median
    compare_s: float = 4.0  # measured seconds of each side-by-side run
    # A closed loop's throughput depends on how many requests it keeps in flight, and not alike
    # for every server: a group commit amortises more with more in flight, an HTTP server's own
    # overhead may grow with its connections. So each server's maximum of each workload is taken
    # at the connection count that served it best in a short probe at each of these (the same
    # choice for every server); one count skips the probe.
    compare_connections: tuple[int, ...] = (32, 64, 128)
    probe_s: float = 2.0  # measured seconds of each probe
    peers: tuple[str, ...] = PEERS
    # Tally embedded with this many API processes in front of its one likes writer
    # (``tally serve --workers N``), each beside the others; 1 is the target "tally", N
    # "tally-Np".
    tally_processes: tuple[int, ...] = (1, 2)
    wrk: bool = True  # each closed-loop maximum measured again by wrk
    cluster: bool = True  # Tally on its scale-out backends (tally_dev.cluster), one process per role
    cluster_only: bool = False  # only that: the per-role figures `tally capacity --from` reads
    params: Params = Params()


QUICK = SuitePlan(duration_s=1.0, warmup_s=0.3, connections=4, sweep=(0.5,), bulk_sweep=(),
                  rounds=1, compare_s=1.0, compare_connections=(4,), peers=(), wrk=False, cluster=False,
                  params=Params(items=10_000))
COMPARED = ("uniform", "viral", "feed", "counts")  # every server of the side-by-side serves these
# An open-loop run's pool carries its rate with every request taking up to this long (the likes'
# latency target): a server that meets it never makes the generator wait for a free connection,
# and one that does not holds the queue itself. A pool sized for the closed loop's shorter
# service times left the queue in the generator instead (its wait is "gen wait" in results.md).
OPEN_LOOP_BOUND_S = 0.05
# The suite's one generator address stands for many clients: Tally's per-client connection cap
# (256 by default) raised so that an open-loop pool fits.
CLIENT_CONNECTIONS = 1024


class Suite:
    def __init__(self, plan: SuitePlan, work: Path, show_progress: bool = True) -> None:
        self.plan = plan
        self.work = work
        self.show_progress = show_progress
        self.runs: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.extra: dict[str, Any] = {}
        self.pids: dict[str, int] = {}  # target -> server pid, for its processes' CPU per run
        # target -> preset -> the connection count its maximum is measured at (``probe``)
        self.connections: dict[str, dict[str, int]] = {}

    def measure(self, target: str, port: int, preset: str, mode: str = "closed",
                rate: float = 0.0, round_: int | None = None, tool: str = "loadgen",
                suffix: str = "", **over: Any) -> dict[str, Any]:
        p = self.plan
        name = f"{target}/{preset}" + (f"@{rate:.0f}" if mode == "open" else "") + suffix
        name += f" r{round_ + 1}" if round_ is not None and p.rounds > 1 else ""
        spec = RunSpec(name=name, host=HOST, port=port, preset=preset, mode=mode, rate=rate,
                       duration_s=p.duration_s, warmup_s=p.warmup_s, connections=p.connections,
                       workers=p.workers, seed=p.seed, params=p.params, run_id=len(self.runs) + 1)
        spec = replace(spec, **over)
        url = f"http://{HOST}:{port}"
        tally = is_tally(target)
        settled = server_stats.settle(url) if tally else None
        before = server_stats.scrape(url) if tally else {}
        pid = self.pids.get(target)
        roots = _server_roots(pid, port) if pid else {}
        cpu_before = cpu.tree_cpu_s(roots)
        result = run_dict(loadgen.run(spec, self.show_progress))
        result.update(target=target, round=round_, tool=tool)
        if roots:
            result["server_cpu_us_per_op"] = _per_op(cpu.delta(cpu_before, cpu.tree_cpu_s(roots)),
                                                     result["ok"], spec)
        if before:
            result["server"] = server_stats.delta(before, server_stats.scrape(url))
            result["server"]["settle_s"] = settled
            result["server"]["hot_items"] = server_stats.hot_items(url)
        self.runs.append(result)
        return result

    def confirm(self, target: str, port: int, preset: str, round_: int | None = None,
                duration_s: float | None = None, connections: int | None = None) -> None:
        """The same closed-loop maximum by wrk, right after the suite's own generator."""
        if not self.plan.wrk:
            return
        name = f"{target}/{preset} wrk" + (f" r{round_ + 1}" if round_ is not None
                                           and self.plan.rounds > 1 else "")
        try:
            result = wrk.run(name, f"http://{HOST}:{port}", preset,
                             duration_s or self.plan.duration_s,
                             connections or self.plan.connections, self.plan.params)
        except (RuntimeError, OSError) as exc:
            self.notes.append(f"{name}: {exc}")
            return
        if self.show_progress:
            print(f"  {name:<40} wrk: {result['throughput_per_s']:>9,.0f}/s  p99 "
                  f"{result['latency']['p99_ms']:.1f} ms", file=sys.stderr)
        result.update(target=target, round=round_)
        self.runs.append(result)

    def max_of(self, target: str, preset: str) -> float:
        return median_max(self.runs, target, preset)

    # -- the parts --------------------------------------------------------------------------

    def generator_ceiling(self) -> None:
        """Both generators against a server that does nothing: each one's own ceiling, at the
        most connections the maxima are measured at (where a generator's own work per request
        is highest)."""
        most = max(self.plan.compare_connections)
        with targets.null_server(self.work) as null:
            for preset in ("uniform", "feed"):
                self.measure("null", null.port, preset, connections=most)
                self.confirm("null", null.port, preset, connections=most)
                self.connections.setdefault("null", {})[preset] = most

    def probe(self, servers: dict[str, int], presets: tuple[str, ...] = COMPARED) -> None:
        """For each server and workload, the connection count (of ``compare_connections``) at
        which the suite's generator measured the most throughput in a short run: where its
        maximum is then measured, by both generators. Probes are kept as runs of their own
        (``"tool": "probe"``), so they never count as a maximum."""
        levels = self.plan.compare_connections
        for preset in presets:
            for target, port in servers.items():
                best = (-1.0, levels[0])
                for n in levels if len(levels) > 1 else ():
                    run = self.measure(target, port, preset, duration_s=self.plan.probe_s,
                                       warmup_s=min(self.plan.warmup_s, 0.5), connections=n,
                                       tool="probe", suffix=f" c{n}")
                    best = max(best, (run["throughput_per_s"], n))
                self.connections.setdefault(target, {})[preset] = best[1]

    def connections_of(self, target: str, preset: str) -> int:
        return self.connections.get(target, {}).get(preset, self.plan.compare_connections[0])

    def compare(self, servers: dict[str, int]) -> None:
        """Closed-loop maxima of every server, interleaved: each round runs every (server, preset)
        once, so a change in the machine's background load falls on all of them alike instead of
        on whichever ran last; the tables quote the median over the rounds."""
        self.probe(servers)
        for rnd in range(self.plan.rounds):
            for preset in COMPARED:
                for target, port in servers.items():
                    n = self.connections_of(target, preset)
                    self.measure(target, port, preset, round_=rnd, duration_s=self.plan.compare_s,
                                 connections=n)
                    self.confirm(target, port, preset, rnd, self.plan.compare_s, n)

    def tally_only(self, port: int) -> None:
        """Open-loop sweeps (latency at 70% of the maximum) and the workloads peers do not serve."""
        for preset in ("uniform", "viral"):
            self.sweep("tally", port, preset)
        # A batching client keeps few requests in flight, each carrying many likes: as many
        # connections as AsyncTally.batcher's default max_in_flight.
        bulk_conns = max(self.plan.workers, BATCHER_IN_FLIGHT)
        self.measure("tally", port, "bulk", connections=bulk_conns)
        if self.plan.bulk_sweep:
            self.sweep("tally", port, "bulk", self.plan.bulk_sweep, connections=bulk_conns)
        for preset in ("zipf", "mixed", "incr"):
            self.measure("tally", port, preset)
        # The feed's maximum again, just before its open-loop run, on the data the runs above
        # have grown: a feed costs more here than in the rounds on a nearly empty database.
        n = self.connections_of("tally", "feed")
        feed_max = self.measure("tally", port, "feed", connections=n)["throughput_per_s"]
        if feed_max:
            rate = round(0.7 * feed_max)
            self.measure("tally", port, "feed", "open", rate, connections=open_pool(rate, n))

    def side_by_side(self) -> None:
        """Tally and every peer up at once, measured in interleaved rounds, then Tally alone."""
        probes: dict[str, Callable[[], dict[str, float]]] = {}
        with contextlib.ExitStack() as stack, contextlib.ExitStack() as others:
            tally = stack.enter_context(targets.tally_server(
                self.work, "tally", max_connections_per_client=str(CLIENT_CONNECTIONS)))
            servers = {"tally": tally.port}
            if tally.proc is not None:
                self.pids["tally"] = tally.proc.pid
            for n in self.plan.tally_processes:
                if n > 1:
                    name = f"tally-{n}p"
                    srv = others.enter_context(targets.tally_server(
                        self.work, name, workers=str(n),
                        max_connections_per_client=str(CLIENT_CONNECTIONS)))
                    servers[name] = srv.port
                    if srv.proc is not None:
                        self.pids[name] = srv.proc.pid
            for peer in self.plan.peers:
                try:
                    srv, probe = others.enter_context(peer_target(self.work, peer))
                    servers[peer] = srv.port
                    if srv.proc is not None:
                        self.pids[peer] = srv.proc.pid
                    if probe is not None:
                        probes[peer] = probe
                except Exception as exc:  # a missing engine must not hide the other results
                    self.notes.append(f"peer {peer} not measured: {exc}")
                    print(f"\n  peer {peer} not measured: {exc}", file=sys.stderr)
            self.compare(servers)
            for peer, probe in probes.items():
                self.extra[f"{peer}_storage"] = probe()
            # The other servers stop before Tally's own runs (its open-loop latencies among
            # them): idle, they still do their housekeeping on the same two cores (PostgreSQL's
            # autovacuum and checkpoints after the rounds' writes, Redis rewriting its AOF).
            others.close()
            self.tally_only(tally.port)
        db = self.work / "tally" / "data" / "tally.db"
        self.extra["sqlite_storage"] = memory.sqlite_bytes_per_like(db)

    def sweep(self, target: str, port: int, preset: str, shares: tuple[float, ...] | None = None,
              **over: Any) -> None:
        """Open-loop runs at fractions of the closed-loop maximum: latency vs offered load. The
        generator sends each request when it is due on a free connection of a fixed pool, so
        each step's pool is the larger of the maximum's and ``open_pool``'s: fewer connections
        would cap the offered rate (by Little's law) and queue requests in the generator, not in
        the server. A caller's ``connections`` is kept (a batching client's few in flight)."""
        top = self.max_of(target, preset)
        for share in shares or self.plan.sweep:
            if top:
                rate = max(round(share * top, 1), 0.5)
                pool = over.get("connections") or open_pool(rate, self.connections_of(target, preset))
                self.measure(target, port, preset, "open", rate, **{**over, "connections": pool})

    def cluster(self) -> None:
        """The cluster at its smallest: one API, relay and aggregator, one PostgreSQL, NATS, Redis.

        On two cores every extra process competes with the load generator and the API for CPU,
        so this measures the cluster's cost per like on one machine, not its scale-out."""
        from tally_dev.cluster import Layout

        layout = Layout(apis=1, relays=1, aggregators=1, partitions=4, databases=1)
        cluster = DevCluster(self.work / "cluster", layout,
                             settings={"log_level": "WARNING",
                                       "max_connections_per_client": CLIENT_CONNECTIONS})
        try:
            cluster.up()
            port = urlsplit(cluster.urls("api")[0]).port or 80
            groups = {row["name"]: row["pid"] for row in cluster.status()}
            before, started = cpu.tree_cpu_s(groups), time.monotonic()
            time.sleep(5.0)  # idle: the polling and leases every role pays without any load
            idle = cpu.delta(before, cpu.tree_cpu_s(groups))
            self.extra["cluster_idle_cpu_per_s"] = {
                role: round(s / (time.monotonic() - started), 4) for role, s in idle.items()}
            for preset in ("uniform", "viral", "feed"):
                _settle(cluster)
                self.probe({"cluster": port}, (preset,))
                n = self.connections_of("cluster", preset)
                self.measure_cluster(cluster, groups, port, preset, connections=n)
                self.confirm("cluster", port, preset, connections=n)
            # Likes in bulk on uniform items: the relay, NATS and the aggregators then carry full
            # batches, as they do at scale, where one request per like would leave them near empty.
            self.measure_cluster(cluster, groups, port, "bulk",
                                 connections=max(self.plan.workers, BATCHER_IN_FLIGHT),
                                 params=replace(self.plan.params, viral_share=0.0))
            top = self.max_of("cluster", "uniform")
            if top:
                rate = round(0.7 * top, 1)
                self.measure("cluster", port, "uniform", "open", rate,
                             connections=open_pool(rate, self.connections_of("cluster", "uniform")))
            self.extra["cluster_tables"] = _pg_table_bytes(cluster)
            self.extra["cluster_redis"] = _redis_bytes(cluster)
        except Exception as exc:  # a missing engine must not hide the other results
            self.notes.append(f"cluster not measured: {exc}")
            print(f"\n  cluster not measured: {exc}", file=sys.stderr)
        finally:
            cluster.down()

    def measure_cluster(self, cluster: DevCluster, groups: dict[str, int], port: int,
                        preset: str, **over: Any) -> None:
        """A closed-loop maximum of the cluster with the CPU each role spent on it (``cpu_s``,
        over ``cpu_wall_s``: from the load's start until the event log has caught up) and the WAL
        PostgreSQL wrote: what one core of each role serves, for ``tally capacity --from``."""
        _settle(cluster)  # a run before (wrk's) must not leave its backlog to this one
        wal = _pg_wal_bytes(cluster)
        before, started = cpu.tree_cpu_s(groups), time.monotonic()
        run = self.measure("cluster", port, preset, **over)
        _settle(cluster)  # the relay and aggregators finish this run's share
        run["cpu_s"] = cpu.delta(before, cpu.tree_cpu_s(groups))
        run["cpu_wall_s"] = round(time.monotonic() - started, 3)
        if wal is not None and (after := _pg_wal_bytes(cluster)) is not None:
            run["pg_wal_bytes"] = after - wal

    def run(self) -> dict[str, Any]:
        started = time.time()
        load_before = os.getloadavg()
        if self.plan.wrk and not wrk.available():
            self.notes.append("wrk not installed (apt-get install wrk): no second generator")
            self.plan = replace(self.plan, wrk=False)
        if not self.plan.cluster_only:
            self.generator_ceiling()
            self.side_by_side()
        if self.plan.cluster or self.plan.cluster_only:
            self.cluster()
        self.extra["load_average"] = {"before": load_before, "after": os.getloadavg()}
        self.extra["connections"] = self.connections
        per_like = {k.removesuffix("_storage"): v["bytes_per_record"]
                    for k, v in self.extra.items() if k.endswith("_storage") and v.get("records")}
        self.extra["memory"] = memory.projection(memory.bytes_per_cached_counter(), per_like)
        from tally_dev.bench.checks import checks

        return {"machine": machine(), "command": " ".join(shlex.quote(a) for a in sys.argv),
                "started": started, "wall_s": time.time() - started, "plan": _plan_dict(self.plan),
                "runs": self.runs, "checks": checks(self.runs, self.extra), "notes": self.notes,
                **self.extra}


def open_pool(rate: float, at_least: int) -> int:
    """Connections an open-loop run at ``rate`` keeps: enough to carry it with every request
    taking ``OPEN_LOOP_BOUND_S``, and never fewer than the closed-loop maximum's ``at_least``."""
    return max(at_least, math.ceil(rate * OPEN_LOOP_BOUND_S))


def is_tally(target: str) -> bool:
    """Tally embedded, with one API process ("tally") or several ("tally-2p")."""
    return target == "tally" or (target.startswith("tally-") and target.endswith("p"))


def _server_roots(pid: int, port: int) -> dict[str, int]:
    """The server process and each child as roots: a child listening on the server's port is
    another API process (``tally serve --workers N``), any other one a helper (Tally's SQLite
    writer, granian's worker)."""
    api = set(cpu.listening(port))
    return {"server": pid, **{f"{'api' if c in api else 'child'}-{n}": c
                              for n, c in enumerate(cpu.children(pid))}}


def _per_op(spent: dict[str, float], ok: int, spec: RunSpec) -> dict[str, float]:
    """CPU microseconds per completed operation, over the whole run (warm-up included): the API
    processes' (the server's own, its tree less its children's, plus any other API process's)
    and its other children's."""
    done = max(ok * (spec.warmup_s + spec.duration_s) / spec.duration_s, 1)
    child, api = spent.get("child", 0.0), spent.get("api", 0.0)
    out = {"server": round((spent.get("server", 0.0) - child) / done * 1e6, 1),
           "children": round(child / done * 1e6, 1)}
    if api:
        out["other_api"] = round(api / done * 1e6, 1)  # included in "server"
    return out


def _settle(cluster: DevCluster, timeout_s: float = 20.0) -> None:
    """Waits until the event log has no backlog; a run that does not settle is measured anyway."""
    cluster.settled(timeout_s)


def _pg_wal_bytes(cluster: DevCluster) -> int | None:
    """WAL bytes written so far, summed over the cluster's PostgreSQL servers."""
    try:
        return sum(int(e.psql("SELECT pg_current_wal_lsn() - '0/0'").strip().split(".")[0])
                   for e in cluster.engines.values() if isinstance(e, PostgresEngine))
    except (EngineError, OSError, ValueError):
        return None


def _pg_table_bytes(cluster: DevCluster) -> dict[str, dict[str, float]]:
    """Bytes on disk per row (the table with its indexes) over every database: a like record
    (``toggles``) and an item's count (``counts``)."""
    out = {}
    for table in ("toggles", "counts"):
        size = rows = 0
        for engine in cluster.engines.values():
            if not isinstance(engine, PostgresEngine):
                continue
            try:
                got = engine.psql(f"SELECT pg_total_relation_size('{table}'), count(*) FROM {table}",
                                  database="tally")
            except (EngineError, OSError):
                return {}
            a, b = got.strip().split("|")
            size, rows = size + int(a), rows + int(b)
        out[table] = {"records": float(rows), "bytes": float(size),
                      "bytes_per_record": size / rows if rows else 0.0}
    return out


def _redis_bytes(cluster: DevCluster) -> dict[str, float]:
    """Redis memory per cached count, over the keys Tally itself wrote during the cluster runs
    (aggregators' absolute counts and the read path's fills): memory above an empty server's."""
    import redis

    engine = cluster.engines.get("redis")
    if engine is None:
        return {}
    try:
        client = redis.Redis.from_url(engine.url)
        info, keys = client.info("memory"), client.dbsize()
        client.close()
    except (redis.RedisError, OSError):
        return {}
    used = float(info["used_memory"]) - float(info["used_memory_startup"])
    return {"records": float(keys), "bytes": used, "bytes_per_record": used / keys if keys else 0.0}


def _plan_dict(plan: SuitePlan) -> dict[str, Any]:
    return orjson.loads(orjson.dumps(plan, default=lambda o: o.__dict__))  # type: ignore[no-any-return]


@contextlib.contextmanager
def peer_target(work: Path, peer: str) -> Iterator[tuple[targets.HttpServer,
                                                   Callable[[], dict[str, float]] | None]]:
    """A peer's engine and its lean server; yields the server and a storage-size probe (None
    for the bare server, which stores nothing)."""
    from tally_dev.bench.peer_engines import peer_engine

    with peer_engine(work, peer) as (kind, url, stats), targets.peer_server(work, peer, kind, url) as srv:
        yield srv, stats


def keep_tally_logs(work: Path, out: Path) -> list[Path]:
    """Tally's server logs (``tally serve`` of each embedded target) into ``out/logs``, before the
    work directory goes: their "slow commit" and "event loop stalled" lines, with times, are
    what an open-loop run's latency spikes are matched against."""
    kept = []
    for log in sorted(work.glob("tally*/*.log")):
        dest = out / "logs" / f"{log.parent.name}-{log.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, dest)
        kept.append(dest)
    return kept


def run_suite(out: Path, plan: SuitePlan, show_progress: bool = True) -> dict[str, Any]:
    """Runs the suite and writes result.json, results.md and the plots into ``out``."""
    from tally_dev.bench.plots import plot_all
    from tally_dev.bench.summary import write_markdown

    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tally-bench-"))
    os.chmod(work, 0o755)  # PostgreSQL runs as an unprivileged user and must reach its directory
    try:
        result = Suite(plan, work, show_progress).run()
    except BaseException:
        print(f"suite failed; its servers' data and logs are kept in {work}", file=sys.stderr)
        raise
    keep_tally_logs(work, out)
    shutil.rmtree(work, ignore_errors=True)  # hundreds of MB of databases after a full suite
    (out / "result.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    result["plots"] = plot_all(result, out)
    write_markdown(result, out / "results.md")
    return result
