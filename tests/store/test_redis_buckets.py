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

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_two_processes_share_one_bucket(redis_url: str) -> None:
    a, b = RedisCounts(redis_url), RedisCounts(redis_url)
    await a.start()
    await b.start()
    try:
        rate, name = Rate(1.0, 6.0), f"user:{uuid.uuid4()}"
        shared = [RedisBuckets(a), RedisBuckets(b)]
        waits = [await shared[n % 2].take(name, rate, 0.0, 1.0) for n in range(8)]
        assert waits[:6] == [0.0] * 6  # six tokens in all, not six each
        assert all(0 < w <= 1.0 for w in waits[6:])
        assert await shared[0].take(f"user:{uuid.uuid4()}", rate, 0.0, 1.0) == 0.0
    finally:
        await a.close()
        await b.close()


async def test_concurrent_takes_share_a_script_call_and_the_limit(redis_url: str) -> None:
    counts = RedisCounts(redis_url)
    await counts.start()
    try:
        buckets, rate = RedisBuckets(counts), Rate(1.0, 6.0)
        await buckets.take(f"user:{uuid.uuid4()}", rate, 0.0, 1.0)  # the script loaded

        async def script_calls() -> int:
            stats = await counts.client.info("commandstats")
            return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha",
                                                                                   "eval"))

        before = await script_calls()
        hot, others = f"user:{uuid.uuid4()}", [f"user:{uuid.uuid4()}" for _ in range(10)]
        waits = await asyncio.gather(*(buckets.take(hot, rate, 0.0, 1.0) for _ in range(20)),
                                     *(buckets.take(name, rate, 0.0, 1.0) for name in others))
        assert waits[:6] == [0.0] * 6 and all(w > 0 for w in waits[6:20])  # one bucket's six
        assert waits[20:] == [0.0] * 10  # each other user's own bucket
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
        await buckets.take(f"user:{uuid.uuid4()}", rate, 0.0, 1.0)  # the script loaded

        async def calls() -> dict[str, int]:
            stats = await counts.client.info("commandstats")
            return {c: int(stats.get(f"cmdstat_{c}", {}).get("calls", 0))
                    for c in ("get", "set", "hmget", "hset", "pexpire")}

        before = await calls()
        names = [f"user:{uuid.uuid4()}" for _ in range(10)]
        assert await asyncio.gather(*(buckets.take(n, rate, 0.0, 1.0) for n in names)) == [0.0] * 10
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
