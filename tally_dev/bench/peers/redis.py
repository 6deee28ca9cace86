"""Peer: Redis with a Lua script. A set of likers per item, a count per item, a set of likes per user.

Like: SADD the user into the item's set and, only if added, INCR the item's count and SADD the item
into the user's set, atomically in one script (the reverse for unlike). A feed is one pipelined
round trip: MGET of the 50 counts and, for the viewer, SMISMEMBER of the 50 items in the user's
set. Durability is the server's AOF: ``appendfsync always`` fsyncs before it answers, equal to
Tally's ``synchronous=FULL``; ``everysec`` answers before the fsync and may lose the last second.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

_LIKE = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 then
    redis.call('SADD', KEYS[3], ARGV[2])
    return {1, redis.call('INCR', KEYS[2])}
end
return {0, tonumber(redis.call('GET', KEYS[2]) or '0')}
"""

_UNLIKE = """
if redis.call('SREM', KEYS[1], ARGV[1]) == 1 then
    redis.call('SREM', KEYS[3], ARGV[2])
    return {1, redis.call('DECR', KEYS[2])}
end
return {0, tonumber(redis.call('GET', KEYS[2]) or '0')}
"""


class RedisPeer:
    def __init__(self, url: str, pool_size: int = 16) -> None:
        self.url = url
        self.pool_size = pool_size
        self._redis: aioredis.Redis | None = None
        self._like: Any = None
        self._unlike: Any = None

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise RuntimeError("the Redis peer is not started")
        return self._redis

    async def start(self) -> None:
        # A blocking pool: a request waits for a free connection instead of failing.
        pool = aioredis.BlockingConnectionPool.from_url(self.url, max_connections=self.pool_size,
                                                        timeout=10)
        self._redis = aioredis.Redis(connection_pool=pool)
        self._like = self.redis.register_script(_LIKE)
        self._unlike = self.redis.register_script(_UNLIKE)
        await self.redis.ping()

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def toggle(self, item: str, user: str, on: bool) -> tuple[bool, int]:
        script = self._like if on else self._unlike
        changed, count = await script(keys=[f"likes:{item}", f"count:{item}", f"user:{user}"],
                                      args=[user, item])
        return bool(changed), int(count)

    async def counts(self, items: Sequence[str]) -> list[int]:
        values = await self.redis.mget([f"count:{i}" for i in items])
        return [int(v) if v is not None else 0 for v in values]

    async def feed(self, user: str, items: Sequence[str]) -> list[tuple[int, bool]]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.mget([f"count:{i}" for i in items])
            pipe.smismember(f"user:{user}", list(items))
            values, flags = await pipe.execute()
        return [(int(v) if v is not None else 0, bool(f)) for v, f in zip(values, flags, strict=True)]
