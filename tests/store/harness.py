"""Adapters under contract test, each behind one ``Harness``: the ports it implements, plus the few
test-only powers the suites need (deliver the change log to the counts, restart, corrupt a count).

To put another adapter under the same suites, write a ``make_*`` async context manager yielding a
``Harness`` (ports it lacks stay None and their suites skip it) and register it in ``HARNESSES``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tally.core.coalesce import coalesce
from tally.core.model import CountKey
from tally.store.ports import CountStore, LikeStore, Outbox, Recounter
from tally.store.postgres.cluster import PgCluster
from tally.store.postgres.counts import PostgresCountStore
from tally.store.postgres.likes import PostgresLikeStore
from tally.store.postgres.reconcile import PostgresRecounter
from tally.store.shards import ShardMap
from tally.store.sqlite.store import SqliteStore

CONSUMER = "contract"


@dataclass
class Harness:
    name: str
    port: Callable[[str], Any]  # the current object for "likes", "counts", ... (None: not here)
    pump: Callable[[], Awaitable[int]]  # deliver every logged change to the counts; returns events
    reopen: Callable[[], Awaitable[None]]  # close everything and open it again on the same data
    corrupt: Callable[[CountKey, int], Awaitable[None]]  # overwrite a stored count (drift)
    extra: dict[str, Any] = field(default_factory=dict)

    # Properties, so a suite holding the harness follows ``reopen`` to the new objects.
    @property
    def likes(self) -> LikeStore:
        return self._get("likes")  # type: ignore[no-any-return]

    @property
    def counts(self) -> CountStore:
        return self._get("counts")  # type: ignore[no-any-return]

    @property
    def recounter(self) -> Recounter:
        return self._get("recounter")  # type: ignore[no-any-return]

    @property
    def outbox(self) -> Outbox:
        return self._get("outbox")  # type: ignore[no-any-return]

    def _get(self, name: str) -> Any:
        obj = self.port(name)
        if obj is None:
            raise AssertionError(f"{self.name} has no {name}; call need() first")
        return obj

    def need(self, *ports: str) -> None:
        missing = [p for p in ports if self.port(p) is None]
        if missing:
            pytest.skip(f"{self.name} does not implement {', '.join(missing)}")


@contextlib.asynccontextmanager
async def make_sqlite(request: pytest.FixtureRequest, tmp_path: Path,
                      shards: int = 1) -> AsyncIterator[Harness]:
    path = tmp_path / "contract.db"
    box: dict[str, SqliteStore] = {}

    async def open_() -> None:
        box["s"] = SqliteStore(path, likes_shards=shards)
        await box["s"].start()

    async def pump() -> int:
        store, total = box["s"], 0
        while shards > 1:  # one log per shard: only the in-place round reads them all
            applied = await store.aggregate(CONSUMER, 10_000, ["day", "region"])
            if not applied.events:
                return total
            total += applied.events
        while True:
            marks = await store.watermarks(CONSUMER)
            events = await store.read(marks.get(store.source, 0), 10_000)
            if not events:
                return total
            batch = coalesce(events, applied=marks)
            assert await store.apply_batch(batch, CONSUMER, marks) is not None
            total += batch.events

    async def reopen() -> None:
        await box["s"].close()
        await open_()

    async def corrupt(key: CountKey, value: int) -> None:
        def job(conn: Any, tx: Any) -> None:
            conn.execute("INSERT INTO counts (counter, item, count) VALUES (?,?,?) ON CONFLICT "
                         "(counter, item) DO UPDATE SET count=excluded.count", (*key, value))

        await box["s"].counts_writer.run(job)  # the counts file's own writer

    def port(name: str) -> Any:
        # The embedded log is consumed in-process and trimmed by the aggregator's own commit:
        # it is a ChangeLog, not a relay's Outbox.
        return None if name == "outbox" else box["s"]

    await open_()
    try:
        name = "sqlite-shards" if shards > 1 else "sqlite"
        yield Harness(name, port, pump, reopen, corrupt)
    finally:
        await box["s"].close()


@contextlib.asynccontextmanager
async def make_postgres(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    # Two databases on one throwaway server, emptied for this test.
    dsns: list[str] = request.getfixturevalue("pg_shared_dsns")
    shard_map = ShardMap.build(64, len(dsns))
    box: dict[str, Any] = {}

    async def open_() -> None:
        cluster = PgCluster(dsns, shard_map, pool_max=8)
        box["likes"] = PostgresLikeStore(cluster, outbox_slots=3)
        box["counts"] = PostgresCountStore(cluster)
        box["recounter"] = PostgresRecounter(cluster, box["counts"], settle_s=0.05)
        box["cluster"] = cluster
        await box["likes"].start()
        await box["counts"].start()

    async def close() -> None:
        await box["likes"].close()
        await box["counts"].close()

    async def pump() -> int:
        """What the relay and an aggregator do, in one loop: outbox -> batch -> counts -> trim."""
        likes, counts, total = box["likes"], box["counts"], 0
        for source in likes.sources():
            while events := await likes.pending(source, 0, 5000):
                marks = await counts.watermarks(CONSUMER)
                batch = coalesce(events, applied=marks)
                assert await counts.apply_batch(batch, CONSUMER, marks) is not None
                await likes.trim(source, events[-1].seq)
                total += batch.events
        return total

    async def reopen() -> None:
        await close()
        await open_()

    async def corrupt(key: CountKey, value: int) -> None:
        cluster: PgCluster = box["cluster"]
        async with cluster.connection(shard_map.db_of(key[1])) as conn:
            await conn.execute("INSERT INTO counts (item, counter, count) VALUES ($1, $2, $3) "
                               "ON CONFLICT (counter, item) "
                               "DO UPDATE SET count = excluded.count", key[1], key[0], value)

    def port(name: str) -> Any:
        return box["likes" if name == "outbox" else name]

    await open_()
    try:
        yield Harness("postgres", port, pump, reopen, corrupt,
                      extra={"dsns": dsns, "shard_map": shard_map, "box": box})
    finally:
        await close()


HarnessFactory = Callable[[pytest.FixtureRequest, Path], contextlib.AbstractAsyncContextManager[Harness]]
HARNESSES: dict[str, HarnessFactory] = {
    "sqlite": make_sqlite,
    "sqlite-shards": functools.partial(make_sqlite, shards=3),
    "postgres": make_postgres,
}

from tests.store.harness_cluster import make_cluster  # noqa: E402 (needs Harness, defined above)

HARNESSES["cluster"] = make_cluster  # PostgreSQL + relay + JetStream + partition workers + Redis


@pytest.fixture(params=sorted(HARNESSES))
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    """Every registered adapter in turn; the suites are written once against the ports."""
    async with HARNESSES[request.param](request, tmp_path) as h:
        yield h
