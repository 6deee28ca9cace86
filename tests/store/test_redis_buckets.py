"""Rate-limit buckets shared through Redis (issue 16): two API processes (two clients) draw on one
bucket, and a limiter whose Redis is down falls back to its own buckets."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from prometheus_client import CollectorRegistry

from tally.api.auth import Principal
from tally.api.limits import Limiter
from tally.core.bucket import Rate
from tally.core.errors import RateLimited
from tally.store.rediscache.buckets import PREFIX, RedisBuckets
from tally.store.rediscache.counts import RedisCounts
from tally_dev.engines import free_port
from tests.redis_cluster import RedisCluster

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_two_processes_share_one_bucket(redis_url: str) -> None:
    a, b = RedisCounts(redis_url), RedisCounts(redis_url)
    await a.start()
    await b.start()
    try:
        rate, name = Rate(1.0, 6.0), f"user:{uuid.uuid4()}"
        shared = [RedisBuckets(a), RedisBuckets(b)]
        waits = [await shared[n % 2].take_all([name], rate, 1.0) for n in range(8)]
        assert waits[:6] == [None] * 6  # six tokens in all, not six each
        assert all(r is not None and r[0] == name and 0 < r[1] <= 1.0 for r in waits[6:])
        assert await shared[0].take_all([f"user:{uuid.uuid4()}"], rate, 1.0) is None
    finally:
        await a.close()
        await b.close()


async def test_concurrent_takes_share_a_script_call_and_the_limit(redis_url: str) -> None:
    counts = RedisCounts(redis_url)
    await counts.start()
    try:
        buckets, rate = RedisBuckets(counts), Rate(1.0, 6.0)
        await buckets.take_all([f"user:{uuid.uuid4()}"], rate, 1.0)  # the script loaded

        async def script_calls() -> int:
            stats = await counts.client.info("commandstats")
            return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha",
                                                                                   "eval"))

        before = await script_calls()
        hot, others = f"user:{uuid.uuid4()}", [f"user:{uuid.uuid4()}" for _ in range(10)]
        waits = await asyncio.gather(*(buckets.take_all([hot], rate, 1.0) for _ in range(20)),
                                     *(buckets.take_all([name], rate, 1.0) for name in others))
        assert waits[:6] == [None] * 6 and None not in waits[6:20]  # one bucket's six
        assert waits[20:] == [None] * 10  # each other user's own bucket
        assert await script_calls() - before <= 2  # 30 takes: the first alone, then the rest
    finally:
        await counts.close()


async def test_a_limiter_falls_back_to_local_buckets_when_redis_is_down() -> None:
    dead = RedisCounts(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
    await dead.start()
    registry = CollectorRegistry()
    limiter = Limiter(Rate(0.0, 1.0), Rate(0.5, 3.0), registry, shared=RedisBuckets(dead))
    who = Principal("web")
    try:
        for _ in range(3):
            await limiter.check_users(who, ["u1"])
        with pytest.raises(RateLimited):
            await limiter.check_users(who, ["u1"])  # the local bucket still limits
    finally:
        await dead.close()
    assert registry.get_sample_value("tally_rate_limit_local_fallback_total") == 4


async def test_a_take_is_one_read_and_one_write_of_a_string_that_expires(redis_url: str) -> None:
    """Redis's work per like: each take reads its bucket and writes it back with its expiry in
    one command; a bucket is one string key, gone once it would have refilled."""
    counts = RedisCounts(redis_url)
    await counts.start()
    try:
        buckets, rate = RedisBuckets(counts), Rate(2.0, 4.0)
        await buckets.take_all([f"user:{uuid.uuid4()}"], rate, 1.0)  # the script loaded

        async def calls() -> dict[str, int]:
            stats = await counts.client.info("commandstats")
            return {c: int(stats.get(f"cmdstat_{c}", {}).get("calls", 0))
                    for c in ("get", "set", "hmget", "hset", "pexpire")}

        before = await calls()
        names = [f"user:{uuid.uuid4()}" for _ in range(10)]
        assert await asyncio.gather(*(buckets.take_all([n], rate, 1.0) for n in names)) == [None] * 10
        after = await calls()
        assert {c: after[c] - before[c] for c in after} == {
            "get": 10, "set": 10, "hmget": 0, "hset": 0, "pexpire": 0}
        key = PREFIX + names[0]
        assert await counts.client.type(key) in (b"string", "string")
        assert 0 < await counts.client.pttl(key) <= 1000 + 500  # one token to refill: 0.5 s + 1 s
        tokens, _, stamp = (await counts.client.get(key)).decode().partition(":")
        assert float(tokens) == 3.0 and float(stamp) > 0
    finally:
        await counts.close()


async def test_a_bulk_requests_users_are_one_script_call_and_all_or_nothing(
        redis_url: str) -> None:
    """A bulk request names hundreds of users: their takes are one call (a call per user cost a
    round trip each, tens of milliseconds a request), and one user out of tokens refuses the
    request without taking from the others."""
    counts = RedisCounts(redis_url)
    await counts.start()
    try:
        buckets, rate = RedisBuckets(counts), Rate(1.0, 2.0)
        await buckets.take_all([f"user:{uuid.uuid4()}"], rate, 1.0)  # the script loaded
        names = [f"user:{uuid.uuid4()}" for _ in range(300)]
        calls = int((await counts.client.info("commandstats")).get("cmdstat_evalsha",
                                                                    {}).get("calls", 0))
        assert await buckets.take_all(names, rate, 1.0) is None
        stats = await counts.client.info("commandstats")
        assert int(stats["cmdstat_evalsha"]["calls"]) - calls == 1
        assert await buckets.take_all([names[7]], rate, 1.0) is None  # names[7]: no token left
        refused = await buckets.take_all(names, rate, 1.0)
        assert refused is not None and refused[0] == names[7] and 0 < refused[1] <= 1.0
        for name in names[:7] + names[8:]:  # the refused request took nothing: one token each
            tokens = float((await counts.client.get(PREFIX + name)).decode().partition(":")[0])
            assert tokens == pytest.approx(1.0, abs=0.05)
    finally:
        await counts.close()


async def test_on_redis_cluster_a_bulk_takes_each_bucket_in_its_own_slot(
        redis_cluster: RedisCluster) -> None:
    """A request's buckets span the cluster's slots: each is a call of its own (all at once),
    and the first refused bucket of the request is named."""
    counts = RedisCounts(redis_cluster.url, cluster=True)
    await counts.start()
    try:
        buckets, rate = RedisBuckets(counts), Rate(1.0, 1.0)
        names = [f"user:{uuid.uuid4()}" for _ in range(40)]
        assert await buckets.take_all(names, rate, 1.0) is None
        fresh = f"user:{uuid.uuid4()}"
        refused = await buckets.take_all([fresh, *names[3:6]], rate, 1.0)
        assert refused is not None and refused[0] == names[3] and 0 < refused[1] <= 1.0
        assert await counts.client.get(PREFIX + fresh) is not None  # no atomicity across slots
    finally:
        await counts.close()
