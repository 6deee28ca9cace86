"""Token buckets shared by a cluster's API processes, in Redis: one Lua script call per batch.

The arithmetic is ``tally.core.bucket.take``'s, run inside Redis so that concurrent takes from
several processes are atomic, on Redis's clock (``TIME``) so that the processes' clocks need not
agree. A bucket's key expires once it would have refilled: a full bucket holds no information.
Failures are the caller's to handle (``tally.api.limits`` falls back to local buckets).

A take is a request's: the buckets of every user it names, all taken or none
(``Buckets.take_all``'s rule). Every request takes, so a call per take would cost a round trip
per request in the API process and a script call in Redis; takes of one bucket from concurrent
requests share one call instead (``GroupCommit``: one call in flight; takes that arrive meanwhile
go together in the next, so at low load a take goes alone and at once). The script runs them
one after another, each as if alone: the limits are the same. A take of several buckets (a bulk
request's users) has a call of its own, so one call never carries many such takes at once. On
Redis Cluster a take's keys would span slots: there each bucket is a call of its own, all at
once, and a request refused by one of them has still taken from those that granted.
"""

from __future__ import annotations

import asyncio
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
MAX_TAKES = 256  # takes of one bucket per script call

# KEYS: every take's buckets, one take after another. ARGV[1]: the number of takes; then per take
# its number of buckets, rate, burst and cost. Per take the answer is '' (every bucket granted and
# written) or 'i:wait' (bucket i of the take is short for wait seconds; nothing written).
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
local k, a = 0, 2
for g = 1, tonumber(ARGV[1]) do
  local n, rate, burst, cost = tonumber(ARGV[a]), tonumber(ARGV[a+1]), tonumber(ARGV[a+2]),
                               tonumber(ARGV[a+3])
  a = a + 4
  local levels, refused = {}, ''
  for i = 1, n do
    local tokens, stamp = burst, now
    local held = redis.call('GET', KEYS[k + i])
    if held then
      local sep = string.find(held, ':', 1, true)
      tokens = tonumber(string.sub(held, 1, sep - 1)) or burst
      stamp = tonumber(string.sub(held, sep + 1)) or now
    end
    local level = math.min(burst, tokens + math.max(0, now - stamp) * rate)
    if level < cost then
      refused = tostring(i - 1) .. ':' .. tostring((cost - level) / rate)
      break
    end
    levels[i] = level - cost
  end
  if refused == '' then
    for i = 1, n do
      redis.call('SET', KEYS[k + i], tostring(levels[i]) .. ':' .. tostring(now),
                 'PX', math.ceil((burst - levels[i]) / rate * 1000) + 1000)
    end
  end
  out[g] = refused
  k = k + n
end
return out
"""

Take = tuple[Sequence[str], Rate, float]  # (bucket names, their rate, tokens from each)
Refused = tuple[str, float] | None  # the bucket short of tokens and the seconds until it has them


class RedisBuckets:
    """Implements ``tally.api.limits.SharedBuckets`` on the Redis client of ``counts``."""

    def __init__(self, counts: RedisCounts) -> None:
        self.counts = counts
        self._script: Any = None
        self._group: GroupCommit[Take, Refused] = GroupCommit(self._run, in_flight=1,
                                                              max_batch=MAX_TAKES)

    async def take_all(self, names: Sequence[str], rate: Rate, cost: float) -> Refused:
        """``cost`` tokens from each named bucket (distinct names), or from none."""
        if self.counts.cluster:
            refusals = await asyncio.gather(*(self._call([((name,), rate, cost)])
                                              for name in names))
            return next((r[0] for r in refusals if r[0] is not None), None)
        if len(names) > 1:
            return (await self._call([(names, rate, cost)]))[0]
        return await self._group.submit(0, (names, rate, cost))

    async def _run(self, _db: int, takes: Sequence[Take]) -> list[Refused]:
        return await self._call(takes)

    async def _call(self, takes: Sequence[Take]) -> list[Refused]:
        if self._script is None:
            self._script = self.counts.client.register_script(TAKE)
        args: list[float] = [len(takes)]
        for names, rate, cost in takes:
            args += (len(names), rate.rate, rate.burst, cost)
        raw = await self._script(keys=[PREFIX + name for names, _, _ in takes for name in names],
                                 args=args)
        out: list[Refused] = []
        for (names, _, _), answer in zip(takes, raw, strict=True):
            index, _, wait = (answer.decode() if isinstance(answer, bytes) else answer
                              ).partition(":")
            out.append(None if not index else (names[int(index)], float(wait)))
        return out
