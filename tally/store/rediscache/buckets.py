"""Token buckets shared by a cluster's API processes, in Redis: one Lua script call per batch.

The arithmetic is ``tally.core.bucket.take``'s, run inside Redis so that concurrent takes from
several processes are atomic, on Redis's clock (``TIME``) so that the processes' clocks need not
agree. A bucket's key expires once it would have refilled: a full bucket holds no information.
Failures are the caller's to handle (``tally.api.limits`` falls back to local buckets).

Every request takes a token, so a call per take would cost a round trip per request in the API
process and a script call in Redis. Takes from concurrent requests share one call instead
(``GroupCommit``: one call in flight; takes that arrive meanwhile go together in the next, so at
low load a take goes alone and at once). The script takes them one after another, each as if
alone: the limits are the same. On Redis Cluster a batch's keys would span slots: one call per
take there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tally.core.bucket import Rate
from tally.store.groupcommit import GroupCommit
from tally.store.rediscache.counts import RedisCounts

# A bucket is one string, "tokens:stamp", written with its expiry in one SET (a hash took HMGET,
# HSET and PEXPIRE: three commands per take, where this is two). The prefix changed with the
# format, so a key of the old kind is left to expire rather than read as the new one (while old
# and new API processes both run, in a rolling upgrade, a user draws on one bucket of each).
PREFIX = "tally:rl2:"
MAX_TAKES = 256  # takes per script call

TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
for i, key in ipairs(KEYS) do
  local rate, burst, cost = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  local tokens, stamp = burst, now
  local held = redis.call('GET', key)
  if held then
    local sep = string.find(held, ':', 1, true)
    tokens = tonumber(string.sub(held, 1, sep - 1)) or burst
    stamp = tonumber(string.sub(held, sep + 1)) or now
  end
  local level = math.min(burst, tokens + math.max(0, now - stamp) * rate)
  local wait = 0
  if level >= cost then level = level - cost else wait = (cost - level) / rate end
  redis.call('SET', key, tostring(level) .. ':' .. tostring(now),
             'PX', math.ceil((burst - level) / rate * 1000) + 1000)
  out[i] = tostring(wait)
end
return out
"""

Take = tuple[str, Rate, float]  # (bucket name, its rate, tokens)


class RedisBuckets:
    """Implements ``tally.api.limits.SharedBuckets`` on the Redis client of ``counts``."""

    def __init__(self, counts: RedisCounts) -> None:
        self.counts = counts
        self._script: Any = None
        self._group: GroupCommit[Take, float] = GroupCommit(self._run, in_flight=1,
                                                            max_batch=MAX_TAKES)

    async def take(self, name: str, rate: Rate, now: float, cost: float) -> float:
        """``now`` is unused: Redis's clock is the one all processes share."""
        if self.counts.cluster:
            return (await self._call([(name, rate, cost)]))[0]
        return await self._group.submit(0, (name, rate, cost))

    async def _run(self, _db: int, takes: Sequence[Take]) -> list[float]:
        return await self._call(takes)

    async def _call(self, takes: Sequence[Take]) -> list[float]:
        if self._script is None:
            self._script = self.counts.client.register_script(TAKE)
        raw = await self._script(keys=[PREFIX + name for name, _, _ in takes],
                                 args=[x for _, rate, cost in takes
                                       for x in (rate.rate, rate.burst, cost)])
        return [float(w) for w in raw]
