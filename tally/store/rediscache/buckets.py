"""Token buckets shared by a cluster's API processes, in Redis: one Lua script call per take.

The arithmetic is ``tally.core.bucket.take``'s, run inside Redis so that concurrent takes from
several processes are atomic, on Redis's clock (``TIME``) so that the processes' clocks need not
agree. A bucket's key expires once it would have refilled: a full bucket holds no information.
Failures are the caller's to handle (``tally.api.limits`` falls back to local buckets).
"""

from __future__ import annotations

from typing import Any

from tally.core.bucket import Rate
from tally.store.rediscache.counts import RedisCounts

PREFIX = "tally:rl:"

TAKE = """
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local b = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens, stamp = tonumber(b[1]) or burst, tonumber(b[2]) or now
local level = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local wait = 0
if level >= cost then level = level - cost else wait = (cost - level) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(level), 'stamp', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - level) / rate * 1000) + 1000)
return tostring(wait)
"""


class RedisBuckets:
    """Implements ``tally.api.limits.SharedBuckets`` on the Redis client of ``counts``."""

    def __init__(self, counts: RedisCounts) -> None:
        self.counts = counts
        self._script: Any = None

    async def take(self, name: str, rate: Rate, now: float, cost: float) -> float:
        """``now`` is unused: Redis's clock is the one all processes share."""
        if self._script is None:
            self._script = self.counts.client.register_script(TAKE)
        raw = await self._script(keys=[PREFIX + name], args=[rate.rate, rate.burst, cost])
        return float(raw)
