"""Redis hot counts: single server and Redis Cluster, the version guard, and reads while Redis is down."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tally.core.breaker import Breaker
from tally.core.coalesce import Batch
from tally.core.errors import Unavailable
from tally.store.rediscache.counts import PUT_CHUNK, RedisCounts, TieredCounts, count_key
from tally.store.sqlite.store import SqliteStore
from tally_dev.engines import RedisEngine
from tests.engines import EngineFactory
from tests.helpers import open_sqlite

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

KEYS = [("like", f"post:{i}") for i in range(50)]


@pytest.fixture(params=["single", "cluster"])
async def counts(request: pytest.FixtureRequest) -> AsyncIterator[RedisCounts]:
    if request.param == "single":
        rc = RedisCounts(request.getfixturevalue("redis_url"))
    else:
        cluster = request.getfixturevalue("redis_cluster")
        cluster.flushall()
        rc = RedisCounts(cluster.url, cluster=True)
    await rc.start()
    yield rc
    await rc.close()


async def test_a_batch_reads_back_what_was_put(counts: RedisCounts) -> None:
    await counts.put({k: i for i, k in enumerate(KEYS[:30])}, version=7)
    got = await counts.get(KEYS)
    assert got == {k: i for i, k in enumerate(KEYS[:30])}


async def test_an_older_version_never_overwrites_a_newer_one(counts: RedisCounts) -> None:
    await counts.put({KEYS[0]: 10}, version=100)
    await counts.put({KEYS[0]: 3}, version=99)  # a stalled aggregator's late write
    assert await counts.get([KEYS[0]]) == {KEYS[0]: 10}
    await counts.put({KEYS[0]: 11}, version=101)
    assert await counts.get([KEYS[0]]) == {KEYS[0]: 11}


async def test_a_large_round_is_guarded_key_by_key(counts: RedisCounts) -> None:
    """More keys than one script call takes (PUT_CHUNK), some of them newer already."""
    many = [("like", f"post:big{i}") for i in range(1200)]
    await counts.put({k: 1 for k in many[::2]}, version=9)  # half the keys: newer
    await counts.put({k: 2 for k in many}, version=8)
    got = await counts.get(many)
    assert got == {k: 1 if i % 2 == 0 else 2 for i, k in enumerate(many)}


async def test_a_read_fill_never_replaces_an_aggregator_value(counts: RedisCounts) -> None:
    await counts.put({KEYS[0]: 10}, version=5)
    await counts.fill({KEYS[0]: 9, KEYS[1]: 4})
    assert await counts.get(KEYS[:2]) == {KEYS[0]: 10, KEYS[1]: 4}
    assert 0 < await counts.client.ttl(count_key(KEYS[1])) <= counts.ttl_s  # cold items leave
    await counts.put({KEYS[1]: 6}, version=1)  # any aggregator version beats a fill
    assert await counts.get([KEYS[1]]) == {KEYS[1]: 6}
    await counts.delete(KEYS[:2])
    assert await counts.get(KEYS[:2]) == {}


async def test_a_fill_of_more_keys_than_a_call_takes_fills_them_all(counts: RedisCounts
                                                                      ) -> None:
    many = [("like", f"post:fill{n}") for n in range(PUT_CHUNK + 7)]
    await counts.fill({k: n for n, k in enumerate(many)})
    assert await counts.get(many) == {k: n for n, k in enumerate(many)}


async def test_a_mark_rises_with_puts_and_stays_where_a_loss_left_it(counts: RedisCounts
                                                                    ) -> None:
    """The mark vouches for every put under it; one found below the writer's floor (Redis
    restarted without its last puts) is reported and not raised, so later puts hide nothing."""
    if counts.cluster:
        assert await counts.put({KEYS[0]: 1}, version=3, mark="t-cl", floor=0)
        assert await counts.mark("t-cl") is None  # a cluster keeps none: nothing vouched for
        return
    name = f"t-{id(counts)}"
    assert await counts.mark(name) is None
    assert await counts.put({KEYS[0]: 1}, version=5, mark=name, floor=0)
    many = {("like", f"post:mark{i}"): i for i in range(1200)}  # several chunks: mark last
    assert await counts.put(many, version=7, mark=name, floor=5)
    assert await counts.mark(name) == 7
    assert await counts.put({}, version=6, mark=name, floor=7)  # never goes down
    assert await counts.mark(name) == 7
    await counts.client.set("tc:mark:" + name, "5")  # what a restart keeps of the log
    assert not await counts.put({KEYS[0]: 2}, version=9, mark=name, floor=7)
    assert await counts.mark(name) == 5
    assert await counts.get([KEYS[0]]) == {KEYS[0]: 2}  # the counts are written all the same
    assert await counts.put({}, version=9, mark=name, floor=5)  # the re-put, from where it was
    assert await counts.mark(name) == 9


@pytest.fixture
async def sqlite_counts(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    async with open_sqlite(tmp_path / "t.db") as store:
        yield store


async def test_reads_fall_back_to_the_durable_store_while_redis_is_down(
        engine_factory: EngineFactory, sqlite_counts: SqliteStore) -> None:
    redis = engine_factory(RedisEngine)
    redis.start()
    tiered = TieredCounts(RedisCounts(redis.url, timeout_s=0.1), sqlite_counts,
                          Breaker(threshold=1, cooldown_s=60.0))
    await tiered.start()
    try:
        batch = Batch(deltas={KEYS[0]: 3, KEYS[1]: 1}, positions={"s0": 4})
        assert await sqlite_counts.apply_batch(batch, "agg", {}) is not None
        assert await tiered.get(KEYS[:3]) == {KEYS[0]: 3, KEYS[1]: 1}  # misses, from the store
        assert tiered.misses == 3
        redis.kill()
        assert await tiered.get(KEYS[:3]) == {KEYS[0]: 3, KEYS[1]: 1}
        assert tiered.fallbacks == 1 and tiered.breaker.is_open
        assert await tiered.get(KEYS[:3]) == {KEYS[0]: 3, KEYS[1]: 1}  # breaker: Redis skipped
        assert tiered.fallbacks == 2
    finally:
        await tiered.close()


async def test_a_put_to_a_redis_that_is_down_raises_unavailable(engine_factory: EngineFactory) -> None:
    """The aggregator keeps the values and retries on the port's error, not on a driver's."""
    redis = engine_factory(RedisEngine)
    redis.start()
    rc = RedisCounts(redis.url, timeout_s=0.1)
    await rc.start()
    try:
        await rc.put({KEYS[0]: 1}, version=1)
        redis.kill()
        with pytest.raises(Unavailable):
            await rc.put({KEYS[0]: 2}, version=2)
    finally:
        await rc.close()
