"""The read path: single flight for concurrent misses, write-through from the aggregator."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio
import pytest

from tally.core.hotkeys import SpaceSaving
from tally.core.lru import LRU
from tally.core.model import CountKey
from tally.service.reads import CountReader
from tally.store.sqlite.store import SqliteStore
from tally.workers.aggregator import Aggregator
from tests.helpers import like

pytestmark = pytest.mark.anyio


class CountingStore(SqliteStore):
    """The real store, remembering each batch read. Each read first yields to the event loop a
    while, as a read on a busy disk would, so concurrent readers really wait on one another (the
    store's lookups run inline and would finish before the next reader starts)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reads: list[list[CountKey]] = []
        self.fail = False

    async def get(self, keys: Sequence[CountKey]) -> dict[CountKey, int]:
        self.reads.append(list(keys))
        await anyio.sleep(0.01)
        if self.fail:
            raise OSError("disk on fire")
        return await super().get(keys)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CountingStore]:
    s = CountingStore(tmp_path / "t.db")
    await s.start()
    yield s
    await s.close()


def reader(store: CountingStore) -> CountReader:
    cache: LRU[CountKey, int] = LRU(100, 60.0)
    return CountReader(store, cache, SpaceSaving(8))


async def test_concurrent_misses_are_one_read(store: CountingStore) -> None:
    await store.write([like(u, "post:viral") for u in range(7)])
    await Aggregator(store, store, window_s=0.001).drain()
    r = reader(store)
    key = ("like", "post:viral")
    got: list[int] = []

    async def read() -> None:
        got.append((await r.get([key]))[0])

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(read)
    assert got == [7] * 20
    assert len(store.reads) == 1 and r.coalesced == 19
    assert (await r.get([key, ("like", "post:none"), key])) == [7, 0, 7]
    assert store.reads[-1] == [("like", "post:none")]  # the cached key was not read again


async def test_aggregator_writes_through(store: CountingStore) -> None:
    r = reader(store)
    key = ("like", "post:1")
    agg = Aggregator(store, store, window_s=0.001, on_applied=r.applied)
    assert await r.get([key]) == [0]
    await store.write([like(1, "post:1"), like(2, "post:1")])
    await agg.drain()
    reads = len(store.reads)
    assert await r.get([key]) == [2]
    assert len(store.reads) == reads  # served from the cache the aggregator updated
    r.forget([key])
    assert await r.get([key]) == [2]
    assert len(store.reads) == reads + 1


async def test_a_failed_read_fails_every_waiter(store: CountingStore) -> None:
    r = reader(store)
    store.fail = True
    key = ("like", "post:1")
    errors: list[BaseException] = []

    async def read() -> None:
        try:
            await r.get([key])
        except OSError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(read)
    assert len(errors) == 3 and len(store.reads) == 1 and r.coalesced == 2
    store.fail = False
    assert await r.get([key]) == [0]  # nothing in flight is left behind


async def test_a_read_waits_for_the_keys_in_flight_and_fetches_the_rest(
        store: CountingStore) -> None:
    await store.write([like(1, "post:a"), like(1, "post:b"), like(2, "post:b"), like(1, "post:c")])
    await Aggregator(store, store, window_s=0.001).drain()
    r = reader(store)
    a, b, c = (("like", f"post:{x}") for x in "abc")
    got: dict[str, list[int]] = {}

    async def read(name: str, keys: list[CountKey]) -> None:
        got[name] = await r.get(keys)

    async with anyio.create_task_group() as tg:
        tg.start_soon(read, "first", [a, b])
        await anyio.sleep(0.001)  # the first read is in flight
        tg.start_soon(read, "second", [c, b, c])
    assert got == {"first": [1, 2], "second": [1, 2, 1]}
    assert store.reads[-2:] == [[a, b], [c]] and r.coalesced == 1


async def test_without_write_through_only_hot_items_are_cached_and_looked_up(
        store: CountingStore) -> None:
    """A worker process (or the cluster's API): a hot item's count is cached for ``hot_ttl_s``
    and served from there; a cold one is read from the store every time, without a cache
    lookup, and counted as a miss."""
    await store.write([like(u, "post:hot") for u in range(3)] + [like(9, "post:cold")])
    await Aggregator(store, store, window_s=0.001).drain()
    cache: LRU[CountKey, int] = LRU(100, 60.0)
    r = CountReader(store, cache, SpaceSaving(8), cache_all=False, hot_ttl_s=60.0,
                    hot_share=0.4)
    hot, cold = ("like", "post:hot"), ("like", "post:cold")
    for _ in range(9):  # post:hot is 90% of the reads
        assert await r.get([hot]) == [3]
    assert await r.get([cold]) == [1]
    assert hot in cache and cold not in cache
    reads = len(store.reads)
    assert await r.get([hot, cold]) == [3, 1]
    assert store.reads[reads:] == [[cold]]  # the hot count came from the cache
    misses = cache.misses
    assert await r.get([cold, cold]) == [1, 1]
    assert cache.misses == misses + 2

