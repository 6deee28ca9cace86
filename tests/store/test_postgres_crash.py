"""PostgreSQL killed (SIGKILL, whole server) under concurrent writes: every acknowledged write is
there after the restart, every committed toggle has its outbox row, and the store recovers
without being reopened."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from tally.core.coalesce import coalesce
from tally.core.errors import Unavailable
from tally.core.model import ToggleOp
from tally.store.postgres.build import PostgresConfig, build_postgres
from tally_dev.engines import PostgresEngine
from tests.engines import EngineFactory

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.slow]


async def until_up(check: Callable[[], Awaitable[None]], timeout_s: float = 30.0) -> None:
    """Retry a read until the restarted server answers (pooled connections died with it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await check()
            return
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_acknowledged_writes_survive_a_server_kill(engine_factory: EngineFactory) -> None:
    pg = engine_factory(PostgresEngine)
    pg.start()
    dsns = [pg.create_database("crash0"), pg.create_database("crash1")]
    stores = build_postgres(PostgresConfig(dsns, logical_shards=64, pool_max=6))
    await stores.start()
    acked: list[ToggleOp] = []

    async def writer(w: int) -> None:
        for n in range(400):  # bounded; the kill ends it much earlier
            op = ToggleOp("like", f"post:{n % 7}", f"w{w}-{n}", True, "eu")
            try:
                await stores.likes.write([op])
            except Unavailable:
                return
            acked.append(op)

    try:
        writers = asyncio.gather(*(writer(w) for w in range(6)))
        while len(acked) < 60:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(pg.kill)
        await writers
        assert stores.cluster.unavailable >= 1  # each writer stopped on an Unavailable
        pg.start()
        for op in acked:
            async def has(op: ToggleOp = op) -> None:
                assert await stores.likes.has("like", op.user, [op.item]) == [True]
            await until_up(has)
        rows = [e for s in stores.likes.sources() for e in await stores.likes.pending(s, 0, 10**6)]
        logged = {(e.user, e.item) for e in rows}
        assert len(logged) == len(rows)  # one row per change
        assert {(op.user, op.item) for op in acked} <= logged
        for src in stores.likes.sources():  # numbering has no hole, even across the crash
            seqs = [e.seq for e in rows if e.source == src]
            assert seqs == list(range(1, len(seqs) + 1))
        batch = coalesce(rows)
        assert await stores.counts.apply_batch(batch, "c", {}) is not None
        for src, seq in batch.positions.items():  # what the relay does once published
            await stores.likes.trim(src, seq)
        recount = await stores.recounter.reconcile_chunk(["like"], [f"post:{i}" for i in range(7)],
                                                         None, 100, repair=False)
        assert recount.drifts == []
        total = sum((await stores.counts.get([("like", f"post:{i}") for i in range(7)])).values())
        assert total == len(rows) >= len(acked)
    finally:
        await stores.close()
