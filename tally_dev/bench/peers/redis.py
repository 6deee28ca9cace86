"""Peer: Redis with a Lua script. A set of likers per item and a count per item.

Like: SADD the user into the item's set and, only if added, INCR the item's count, atomically in
one script (the reverse, SREM and DECR, for unlike). Durability is the server's: ``appendfsync
everysec`` acknowledges before the fsync and may lose up to a second of likes on a machine crash,
which is weaker than Tally's ``synchronous=FULL``; without AOF nothing survives a restart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

_LIKE = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 then
    return {1, redis.call('INCR', KEYS[2])}
end
return {0, tonumber(redis.call('GET', KEYS[2]) or '0')}
"""

_UNLIKE = """
if redis.call('SREM', KEYS[1], ARGV[1]) == 1 then
    return {1, redis.call('DECR', KEYS[2])}
end
return {0, tonumber(redis.call('GET', KEYS[2]) or '0')}
"""


_HAS = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('SISMEMBER', key, ARGV[1]) end
return out
"""


_FEED = """
local out = {}
for i = 1, #KEYS, 2 do
    out[#out + 1] = tonumber(redis.call('GET', KEYS[i + 1]) or '0')
    out[#out + 1] = redis.call('SISMEMBER', KEYS[i], ARGV[1])
end
return out
"""


def _keys(item: str) -> list[str]:
    # One hash tag per item keeps both keys of an item in one slot (the like script runs on a
    # cluster); the has-liked script touches many items, so it needs a single node.
    return [f"likes:{{{item}}}", f"count:{{{item}}}"]


class RedisPeer:
    def __init__(self, url: str, pool_size: int = 32) -> None:
        self.url = url
        self.pool_size = pool_size
        self._redis: aioredis.Redis | None = None
        self._like: Any = None
        self._unlike: Any = None
        self._has: Any = None
        self._feed: Any = None

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
        self._has = self.redis.register_script(_HAS)
        self._feed = self.redis.register_script(_FEED)
        await self.redis.ping()

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def toggle(self, item: str, user: str, on: bool) -> tuple[bool, int]:
        script = self._like if on else self._unlike
        changed, count = await script(keys=_keys(item), args=[user])
        return bool(changed), int(count)

    async def counts(self, items: Sequence[str]) -> list[int]:
        values = await self.redis.mget([_keys(i)[1] for i in items])
        return [int(v) if v is not None else 0 for v in values]

    async def feed(self, user: str, items: Sequence[str]) -> list[tuple[int, bool]]:
        out = await self._feed(keys=[k for i in items for k in _keys(i)], args=[user])
        return [(int(out[k]), bool(out[k + 1])) for k in range(0, len(out), 2)]

    async def has(self, user: str, items: Sequence[str]) -> list[bool]:
        # One script call instead of a pipeline of SISMEMBERs: one command to build and parse.
        flags = await self._has(keys=[_keys(i)[0] for i in items], args=[user])
        return [bool(f) for f in flags]
