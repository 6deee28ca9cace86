"""Power loss on a PostgreSQL node of the cluster, in its durable profile (fsync, synchronous_commit
on, full_page_writes): Tally's PostgreSQL like store under concurrent toggles, the server SIGKILLed
with every backend, the unsynced writes dropped, the server restarted (crash recovery from its
WAL); every acknowledged toggle reads back, and each toggle that is on has exactly its one outbox
row (the change log the counts are made from). Rounds as in test_power_loss.py.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from tally.core.model import ToggleOp
from tally.store.postgres.cluster import PgCluster
from tally.store.postgres.likes import PostgresLikeStore
from tally.store.shards import ShardMap
from tally_dev.engine_bins import missing_binaries
from tally_dev.engines import PostgresEngine
from tally_dev.faultfs import FaultFS, available
from tests.faults.harness import ITEMS, USERS_PER_WORKER, WORKERS, Ledger, Pair, report

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.integration]

ROUNDS = int(os.environ.get("TALLY_CHAOS_ROUNDS", "1"))
BUDGET_S = float(os.environ.get("TALLY_CHAOS_SECONDS", "60"))
# postgres_synchronous_commit: "on" (the default, asserted to lose nothing acknowledged) and "off"
# (documented to lose the last moments of commits: measured). `make chaos-storage` runs both.
PROFILES = os.environ.get("TALLY_CHAOS_PG_PROFILES", "on").split(",")


@pytest.fixture
def pg_on_faultfs() -> Iterator[tuple[FaultFS, PostgresEngine]]:
    """A FaultFS mount that the ``postgres`` user may enter, and a PostgreSQL cluster on it."""
    if not os.path.exists("/dev/fuse") or available() is not None:
        pytest.skip(f"faultfs cannot run: {available() or 'no /dev/fuse'}")
    if missing_binaries(("postgres",)):
        pytest.skip("no PostgreSQL binaries")
    base = Path(tempfile.mkdtemp(prefix="tally-pgfault-"))
    base.chmod(0o755)
    fs = FaultFS(base / "backing", base / "mnt", base / "faultfs.log")
    (base / "backing").mkdir(mode=0o755)
    fs.mount()
    engine = PostgresEngine(fs.mountpoint / "pg")
    engine.die_with_parent = True
    try:
        yield fs, engine
    finally:
        engine.kill()
        fs.unmount(grace_s=2.0)  # the test is done with the data: no need to wait the daemon out
        shutil.rmtree(base, ignore_errors=True)


async def pg_load(store: PostgresLikeStore, ledger: Ledger, seed: int) -> None:
    async def worker(w: int) -> None:
        rng = random.Random(seed * 1000 + w)
        while True:
            pair = (w * USERS_PER_WORKER + rng.randrange(USERS_PER_WORKER), rng.randrange(ITEMS))
            on = rng.random() < 0.6
            sent_at = ledger.sent({pair: on})
            try:
                await store.write([ToggleOp("like", f"post:{pair[1]}", str(pair[0]), on, "eu")])
            except Exception:  # the server is gone (Unavailable, or the driver's own error)
                return  # this op's fate is unknown
            ledger.answered({pair: on}, 200, sent_at)

    async with anyio.create_task_group() as tg:
        for w in range(WORKERS):
            tg.start_soon(worker, w)


async def check(store: PostgresLikeStore, cluster: PgCluster, ledger: Ledger) -> int:
    losses = 0
    items = [f"post:{i}" for i in range(ITEMS)]
    for user in range(WORKERS * USERS_PER_WORKER):
        for item, got in enumerate(await store.has("like", str(user), items)):
            pair: Pair = (user, item)
            before = ledger.acked.get(pair, False)
            if pair in ledger.in_doubt:
                if got not in {before} | ledger.in_doubt.pop(pair):
                    losses += 1  # an older state came back: the acknowledged one is lost
            elif got is not before:
                losses += 1
            ledger.acked[pair] = got
    async with cluster.connection(0) as conn:  # the outbox rows sum to the toggles that are on
        on = await conn.fetch("SELECT item, count(*) FROM toggles WHERE state GROUP BY item")
        logged = await conn.fetch("SELECT item, sum(delta) FROM outbox GROUP BY item HAVING "
                                  "sum(delta) <> 0")
    assert {r[0]: r[1] for r in on} == {r[0]: r[1] for r in logged}
    return losses


@pytest.mark.parametrize("synchronous_commit", PROFILES)
async def test_postgres_power_loss_loses_no_acknowledged_toggle(
        pg_on_faultfs: tuple[FaultFS, PostgresEngine], synchronous_commit: str) -> None:
    fs, engine = pg_on_faultfs
    seed = int(os.environ.get("TALLY_CHAOS_SEED", str(time.time_ns() % 1_000_000)))
    print(f"seed {seed}")
    rng = random.Random(seed)
    ledger = Ledger()
    rounds = losses = undone = 0
    started = time.monotonic()
    await anyio.to_thread.run_sync(engine.start)
    while rounds < ROUNDS and (rounds == 0 or time.monotonic() - started < BUDGET_S):
        cluster = PgCluster([engine.dsn()], ShardMap.build(16, 1), pool_max=WORKERS + 2,
                            synchronous_commit=synchronous_commit,
                            failover_s=0)  # no retrying a dead server: the round is over
        store = PostgresLikeStore(cluster, outbox_slots=2)
        await store.start()
        async with anyio.create_task_group() as tg:
            tg.start_soon(pg_load, store, ledger, seed + rounds)
            target = ledger.acks + rng.randint(1, 150)
            with anyio.fail_after(120):
                while ledger.acks < target:
                    await anyio.sleep(0.002)
            await anyio.sleep(rng.uniform(0, 0.03))
            await anyio.to_thread.run_sync(engine.kill)
        await store.close()
        undone += await anyio.to_thread.run_sync(fs.cut)
        await anyio.to_thread.run_sync(engine.start)
        cluster = PgCluster([engine.dsn()], ShardMap.build(16, 1), pool_max=4)
        store = PostgresLikeStore(cluster, outbox_slots=2)
        await store.start()
        try:
            losses += await check(store, cluster, ledger)
        finally:
            await store.close()
        rounds += 1
    await anyio.to_thread.run_sync(engine.stop)
    report("postgres-power-loss", synchronous_commit=synchronous_commit, seed=seed, rounds=rounds,
           acknowledged=ledger.acks, unsynced_bytes_dropped=undone, losses=losses)
    assert ledger.acks > rounds and undone > 0
    if synchronous_commit == "on":
        assert losses == 0, f"{losses} acknowledged toggles lost (seed {seed})"


async def test_postgres_on_a_disk_that_ignores_fsync_loses_toggles(
        pg_on_faultfs: tuple[FaultFS, PostgresEngine]) -> None:
    """The control: the same round with fsync lying during the load must show losses."""
    fs, engine = pg_on_faultfs
    ledger = Ledger()
    await anyio.to_thread.run_sync(engine.start)
    cluster = PgCluster([engine.dsn()], ShardMap.build(16, 1), pool_max=WORKERS + 2,
                        failover_s=0)
    store = PostgresLikeStore(cluster, outbox_slots=2)
    await store.start()
    fs.set_lying(True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pg_load, store, ledger, 5)
        with anyio.fail_after(120):
            while ledger.acks < 60:
                await anyio.sleep(0.002)
        await anyio.to_thread.run_sync(engine.kill)
    await store.close()
    await anyio.to_thread.run_sync(fs.cut)
    await anyio.to_thread.run_sync(engine.start)
    cluster = PgCluster([engine.dsn()], ShardMap.build(16, 1), pool_max=4)
    store = PostgresLikeStore(cluster, outbox_slots=2)
    await store.start()
    try:
        losses = await check(store, cluster, ledger)
    finally:
        await store.close()
    await anyio.to_thread.run_sync(engine.stop)
    report("postgres-power-loss-control", acknowledged=ledger.acks, losses=losses)
    assert losses > 0
