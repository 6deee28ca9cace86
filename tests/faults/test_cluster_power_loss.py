"""Power loss of the whole cluster: PostgreSQL, JetStream and Redis on filesystems that forget.

The `tally cluster up` set (``tally_dev.cluster.DevCluster``: two PostgreSQL shard databases,
NATS JetStream, Redis, an API process, a relay, an aggregator), with the engines' data directories
on FaultFS mounts, under the mixed like/unlike load of the embedded tests and its client ledger.
At a random moment every process (engines and Tally's) gets SIGKILL at once, the unsynced writes
of every engine are dropped, everything restarts on the same data. Then:

- every acknowledged like/unlike reads back (``/v1/has``), the in-doubt ones settle either way;
- the count table in PostgreSQL, once the aggregator caught up, equals a recount of the like
  records (above would be an event applied twice across the relay's or the aggregator's
  watermarks, below one lost between the outbox, the stream and the counts);
- no aggregator watermark is past what its source (a shard's outbox) ever numbered;
- the counts served by the API come to equal the recount within seconds (Redis may come back
  without its last second of writes: the aggregators see their cache marks behind and re-put
  those counts; ``redis_ttl_s`` is an hour here, so the TTL cannot be what heals them).

``test_redis_power_loss_*`` cuts only Redis's own mount, the rest running, to measure what each
``appendfsync`` level loses and how soon the aggregators put it back. Rounds and budget:
TALLY_CHAOS_CLUSTER_ROUNDS and TALLY_CHAOS_CLUSTER_SECONDS (TALLY_CHAOS_REDIS_ROUNDS for the
Redis test); seed as in test_power_loss.py.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis as redis_py

from tally_dev.cluster import DevCluster, Layout, TallyProcess
from tally_dev.engine_bins import missing_binaries
from tally_dev.engines import Engine, NatsEngine, PostgresEngine, RedisEngine
from tally_dev.faultfs import FaultFS, available
from tests.faults.harness import (
    ITEMS,
    Ledger,
    ledger_counts,
    load,
    read_back,
    report,
    served_counts,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.integration]

# A round restarts every process of the cluster: its own round and time budget.
ROUNDS = int(os.environ.get("TALLY_CHAOS_CLUSTER_ROUNDS", "1"))
BUDGET_S = float(os.environ.get("TALLY_CHAOS_CLUSTER_SECONDS", "60"))
REDIS_ROUNDS = int(os.environ.get("TALLY_CHAOS_REDIS_ROUNDS", "3"))
# Redis's appendfsync: everysec is what Tally's dev cluster and deploy/ run (a cache); always
# is measured beside it by `make chaos-storage`.
REDIS_PROFILES = os.environ.get("TALLY_CHAOS_REDIS_PROFILES", "everysec").split(",")
REDIS_TTL_S = 3600  # the default: a stale cache value must heal long before its expiry
SERVED_WAIT_S = 10.0  # after the count table is right, the served counts must be within this
SETTINGS = {"aggregate_window_ms": 20.0, "lease_period_ms": 200.0, "log_level": "WARNING",
            "redis_ttl_s": REDIS_TTL_S}


class ClusterOnFaultFS(DevCluster):
    """The dev cluster with PostgreSQL's and JetStream's data on ``engines_fs`` and Redis's on
    ``redis_fs``; every process dies with the test process if that is killed."""

    def __init__(self, root: Path, engines_fs: FaultFS, redis_fs: FaultFS, appendfsync: str
                 ) -> None:
        super().__init__(root, Layout(apis=1, relays=1, aggregators=1, partitions=4),
                         settings=SETTINGS)
        self.engines_fs = engines_fs
        self.redis_fs = redis_fs
        self.appendfsync = appendfsync

    def _start_engines(self) -> dict[str, Any]:
        dsns = []
        for db in range(self.layout.databases):
            pg = PostgresEngine(self.engines_fs.mountpoint / f"pg{db}")
            self._start(f"postgres-{db}", pg)
            if pg.psql("SELECT 1 FROM pg_database WHERE datname = 'tally'").strip() != "1":
                pg.create_database("tally")
            dsns.append(pg.dsn("tally"))
        nats = NatsEngine(self.root / "nats")
        nats.store = self.engines_fs.mountpoint / "jetstream"
        self._start("nats", nats)
        return {"postgres_dsns": dsns, "nats_url": nats.url}

    def _start(self, name: str, engine: Engine, timeout_s: float = 60.0) -> None:
        if name == "redis":
            engine = RedisEngine(self.redis_fs.mountpoint / "redis", appendfsync=self.appendfsync)
        engine.die_with_parent = True
        super()._start(name, engine, timeout_s)

    def _start_processes(self) -> None:
        for role, count in (("aggregator", self.layout.aggregators),
                            ("relay", self.layout.relays), ("api", self.layout.apis)):
            for i in range(count):
                proc = TallyProcess(self.root / "procs", role, i, self.config)
                proc.die_with_parent = True
                proc.start(timeout_s=90)
                self.processes[proc.name] = proc
                self._save()

    @property
    def api(self) -> str:
        return self.processes["api-0"].url

    def postgres(self) -> list[PostgresEngine]:
        return [e for n, e in sorted(self.engines.items()) if isinstance(e, PostgresEngine)]

    def kill_all(self, names: list[str] | None = None) -> None:
        """SIGKILL every process (or those named) at once, as a power cut does, then reap."""
        victims = {n: e for n, e in {**self.engines, **self.processes}.items()
                   if names is None or n in names}
        for e in victims.values():
            if e.proc is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(e.proc.pid, signal.SIGKILL)
        for e in victims.values():
            e.kill()

    def power_cut(self, mounts: list[FaultFS], names: list[str] | None = None) -> int:
        """Every process (or those named) killed, the mounts' unsynced writes dropped, the
        mounts rebooted; returns the bytes dropped. Nothing is restarted."""
        self.kill_all(names)
        return sum(fs.cut() for fs in mounts)

    def start_all(self) -> None:
        """Engines first, then the aggregator and relay, then the API (as ``up`` orders them)."""
        for e in self.engines.values():
            e.start(90)
        for role in ("aggregator", "relay", "api"):
            for name, proc in self.processes.items():
                if name.startswith(f"{role}-"):
                    proc.start(90)
        self._save()


def _mount(base: Path, name: str) -> FaultFS:
    (base / name).mkdir(mode=0o755)  # PostgreSQL's user must enter the backing directory too
    return FaultFS(base / name, base / f"{name}-mnt", base / f"{name}.log").mount()


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root``: the set-up (configs, initdb's files) is on disk before
    the first cut, as the kernel's writeback would have put it there on a machine in service."""
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


@pytest.fixture
def cluster_on_faultfs(request: pytest.FixtureRequest) -> Iterator[ClusterOnFaultFS]:
    if not os.path.exists("/dev/fuse") or available() is not None:
        pytest.skip(f"faultfs cannot run: {available() or 'no /dev/fuse'}")
    if missing := missing_binaries():
        pytest.skip(f"missing engines: {', '.join(map(str, missing))}")
    base = Path(tempfile.mkdtemp(prefix="tally-clusterfault-"))
    base.chmod(0o755)
    engines_fs = _mount(base, "engines")
    redis_fs = _mount(base, "redis")
    dev = ClusterOnFaultFS(base / "cluster", engines_fs, redis_fs, request.param)
    try:
        dev.up()
        _fsync_tree(engines_fs.mountpoint)
        _fsync_tree(redis_fs.mountpoint)
        yield dev
    finally:
        dev.kill_all()  # the data is thrown away: no clean shutdown to wait for
        dev.down()
        engines_fs.unmount(grace_s=2.0)  # done with the data: no need to wait the daemon out
        redis_fs.unmount(grace_s=2.0)
        shutil.rmtree(base, ignore_errors=True)


# -- what PostgreSQL holds ------------------------------------------------------------------------


def _rows(dev: ClusterOnFaultFS, sql: str) -> list[list[str]]:
    out = []
    for pg in dev.postgres():
        out += [line.split("|") for line in pg.psql(sql, database="tally").splitlines() if line]
    return out


def _per_item(rows: list[list[str]]) -> list[int]:
    """Sums over the shard databases (a user's records live on the user's shard)."""
    got: dict[str, int] = {}
    for item, n in rows:
        got[item] = got.get(item, 0) + int(n)
    return [got.get(f"post:{i}", 0) for i in range(ITEMS)]


def recount(dev: ClusterOnFaultFS) -> list[int]:
    """Like records that are on, per item, straight from every shard database."""
    return _per_item(_rows(dev, "SELECT item, count(*) FROM toggles "
                                "WHERE counter = 'like' AND state GROUP BY item"))


def stored_counts(dev: ClusterOnFaultFS) -> list[int]:
    return _per_item(_rows(dev, "SELECT item, count FROM counts WHERE counter = 'like'"))


def watermarks_past_heads(dev: ClusterOnFaultFS) -> list[str]:
    """Watermarks beyond what their source numbered: events applied that the outbox lost."""
    heads = {src: int(seq) for src, seq in _rows(dev, "SELECT source, seq FROM outbox_heads")}
    return [f"{consumer} at {source}:{seq} > head {heads[source]}"
            for consumer, source, seq in _rows(dev, "SELECT consumer, source, seq FROM watermarks")
            if source in heads and int(seq) > heads[source]]


def redis_stale(dev: ClusterOnFaultFS, truth: list[int]) -> int:
    """Items whose cached count (when Redis has one) differs from the recount."""
    client = redis_py.Redis.from_url(dev.engines["redis"].url, decode_responses=True)
    try:
        values = [str(v) if v is not None else None
                  for v in client.mget([f"tc:{{post:{i}}}:like" for i in range(ITEMS)])]
    finally:
        client.close()
    return sum(v is not None and int(v.partition(":")[2]) != want
               for v, want in zip(values, truth, strict=True))


# -- a round --------------------------------------------------------------------------------------


async def load_until_cut(dev: ClusterOnFaultFS, ledger: Ledger, rng: random.Random, seed: int,
                         cut: Any) -> int:
    """Mixed load; after a random number of acknowledgements and a random fraction of one
    more, ``cut()`` (in a thread); returns what it returned."""
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(load, dev.api, ledger, seed, stop)
        target = ledger.acks + rng.randint(1, 150)
        with anyio.fail_after(120):
            while ledger.acks < target:
                await anyio.sleep(0.002)
        await anyio.sleep(rng.uniform(0, 0.03))
        result: int = await anyio.to_thread.run_sync(cut)
        stop.set()
    return result


@dataclass
class CountsCheck:
    caught_up: bool  # the count table came to equal the recount
    stale_cache_items: int  # cached values off the recount when the table was right
    served_after_s: float | None  # how long (from ``since``) until the API served the recount
    # (None: never)
    watermarks_ahead: list[str]


async def check_counts(dev: ClusterOnFaultFS, ledger: Ledger, served_wait_s: float,
                       since: float | None = None) -> CountsCheck:
    truth = await anyio.to_thread.run_sync(recount, dev)
    assert truth == ledger_counts(ledger), "the like records differ from the settled ledger"
    caught_up = False
    with anyio.move_on_after(90):
        while not (caught_up := await anyio.to_thread.run_sync(stored_counts, dev) == truth):
            await anyio.sleep(0.2)
    stale = await anyio.to_thread.run_sync(redis_stale, dev, truth)
    started, served_after = time.monotonic(), None
    async with httpx.AsyncClient(base_url=dev.api, timeout=30) as c:
        with anyio.move_on_after(served_wait_s):
            while await served_counts(c) != truth:
                await anyio.sleep(0.1)
            served_after = time.monotonic() - (started if since is None else since)
    return CountsCheck(caught_up, stale, served_after,
                       await anyio.to_thread.run_sync(watermarks_past_heads, dev))


def cache_heals(dev: ClusterOnFaultFS) -> tuple[int, int]:
    """(cache losses seen, counts re-put) summed from the aggregators' /metrics."""
    totals = {"tally_partition_cache_losses": 0, "tally_partition_cache_reputs": 0}
    for name, proc in dev.processes.items():
        if name.startswith("aggregator-"):
            for line in httpx.get(f"{proc.url}/metrics", timeout=10).text.splitlines():
                metric = line.partition("{")[0].removesuffix("_total")
                if metric in totals:
                    totals[metric] += int(float(line.rpartition(" ")[2]))
    return totals["tally_partition_cache_losses"], totals["tally_partition_cache_reputs"]


def _seed() -> int:
    seed = int(os.environ.get("TALLY_CHAOS_SEED", str(time.time_ns() % 1_000_000)))
    print(f"seed {seed}")
    return seed


@pytest.mark.parametrize("cluster_on_faultfs", REDIS_PROFILES, indirect=True)
async def test_cluster_power_loss_loses_no_acknowledged_like(
        cluster_on_faultfs: ClusterOnFaultFS) -> None:
    dev = cluster_on_faultfs
    seed = _seed()
    rng = random.Random(seed)
    ledger = Ledger()
    rounds = losses = resolved = undone = behind = stale = heals = reputs = 0
    ahead: list[str] = []
    served_s: list[float | None] = []
    started = time.monotonic()
    while rounds < ROUNDS and (rounds == 0 or time.monotonic() - started < BUDGET_S):
        undone += await load_until_cut(dev, ledger, rng, seed + rounds, lambda: dev.power_cut(
            [dev.engines_fs, dev.redis_fs]))
        await anyio.to_thread.run_sync(dev.start_all)
        lost, settled = await read_back(dev.api, ledger)
        check = await check_counts(dev, ledger, served_wait_s=SERVED_WAIT_S)
        seen, put_again = await anyio.to_thread.run_sync(cache_heals, dev)
        heals, reputs = heals + seen, reputs + put_again
        losses, resolved, rounds = losses + lost, resolved + settled, rounds + 1
        behind += not check.caught_up
        stale += check.stale_cache_items
        ahead += check.watermarks_ahead
        served_s.append(check.served_after_s)
        if not check.caught_up or check.watermarks_ahead or check.served_after_s is None:
            break  # wrong for good: later rounds would only repeat it
    report("cluster-power-loss", redis_appendfsync=dev.appendfsync, seed=seed, rounds=rounds,
           acknowledged=ledger.acks, in_doubt_settled=resolved, unsynced_bytes_dropped=undone,
           losses=losses, rounds_counts_off_recount=behind, watermarks_ahead=len(ahead),
           stale_cache_items=stale, cache_losses_seen=heals, counts_reput=reputs,
           served_recount_after_s_max=max((s for s in served_s if s is not None), default=None),
           rounds_served_never_converged=served_s.count(None), redis_ttl_s=REDIS_TTL_S)
    assert ledger.acks > rounds and undone > 0
    assert losses == 0, f"{losses} acknowledged like/unlike states lost (seed {seed})"
    assert behind == 0, f"the count table never came to equal the recount (seed {seed})"
    assert ahead == [], ahead
    assert None not in served_s, (f"the API served counts off the recount {SERVED_WAIT_S} s "
                                  f"after the count table was right (seed {seed})")


# Redis alone: run by `make chaos-storage`, not `make test` (its short case there is
# tests/workers/test_partitions.py::test_cache_writes_lost_by_a_redis_restart_are_put_again).
REDIS_CUT_PROFILES = [p for p in os.environ.get("TALLY_CHAOS_REDIS_CUT", "").split(",") if p]


@pytest.mark.parametrize("cluster_on_faultfs", REDIS_CUT_PROFILES, indirect=True)
async def test_redis_power_loss_heals_the_served_counts_within_seconds(
        cluster_on_faultfs: ClusterOnFaultFS) -> None:
    """The load stops, the aggregator caches its last batches, and within a random moment after
    that Redis loses power (the rest keeps running): whatever Redis acknowledged but had not
    synced is gone, and no later change of those items rewrites it. The aggregator sees its cache
    marks behind and re-puts them: the served counts equal the recount within seconds of Redis's
    restart (the TTL is an hour). Losses seen, counts re-put and the time are measured."""
    dev = cluster_on_faultfs
    seed = _seed()
    rng = random.Random(seed)
    ledger = Ledger()
    rounds = undone = stale = rounds_lost = reputs = 0
    served_s: list[float | None] = []
    started = time.monotonic()
    while rounds < REDIS_ROUNDS and (rounds == 0 or time.monotonic() - started < BUDGET_S):
        await load_until_cut(dev, ledger, rng, seed + rounds, lambda: 0)
        await anyio.sleep(rng.uniform(0, 0.3))  # the aggregator applies and caches meanwhile
        seen_before, reput_before = await anyio.to_thread.run_sync(cache_heals, dev)
        undone += await anyio.to_thread.run_sync(
            lambda: dev.power_cut([dev.redis_fs], names=["redis"]))
        await anyio.to_thread.run_sync(dev.start_all)
        restarted = time.monotonic()
        lost, _ = await read_back(dev.api, ledger)
        assert lost == 0  # Redis holds no like record: nothing acknowledged can go with it
        check = await check_counts(dev, ledger, served_wait_s=SERVED_WAIT_S, since=restarted)
        assert check.caught_up and check.watermarks_ahead == []
        seen, put_again = await anyio.to_thread.run_sync(cache_heals, dev)
        stale += check.stale_cache_items
        rounds_lost += seen > seen_before
        reputs += put_again - reput_before
        served_s.append(check.served_after_s)
        rounds += 1
        if check.served_after_s is None:
            break
    report("redis-power-loss", redis_appendfsync=dev.appendfsync, seed=seed, rounds=rounds,
           acknowledged=ledger.acks, unsynced_bytes_dropped=undone,
           rounds_cache_loss_seen=rounds_lost, counts_reput=reputs,
           stale_cache_items_when_table_right=stale,
           served_recount_after_restart_s_max=max((s for s in served_s if s is not None),
                                                  default=None),
           rounds_served_never_converged=served_s.count(None), redis_ttl_s=REDIS_TTL_S)
    assert None not in served_s, (f"the API served counts off the recount {SERVED_WAIT_S} s "
                                  f"after Redis's restart (seed {seed})")
    if dev.appendfsync == "always":
        assert rounds_lost == 0, f"Redis lost acknowledged cache writes (seed {seed})"
