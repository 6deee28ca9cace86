"""Hot counts in Redis (single server or Redis Cluster), in front of the PostgreSQL count store.

Keys are ``tc:{<item>}:<counter>``: the hash tag is the item, so every counter of one item lives
in one cluster slot. A batch read of many items is one MGET on a single server, and on a cluster
one pipelined round trip per node (redis-py's ``mget_nonatomic`` groups keys by slot).

Values are ``"<version>:<count>"``, written as absolute counts, never increments, so a lost or
repeated write heals with the next one. Aggregators write with version = the stream sequence of
the batch (monotonic per partition, and a key belongs to one partition), through a one-key Lua
compare-and-set, so a stalled aggregator that lost its partition cannot overwrite a newer value
with an older one. The read path fills misses from PostgreSQL with version 0 and ``NX`` (only if
absent), so a fill never replaces an aggregator's value. Every key has a TTL: cold items leave
Redis, and any cache value is at worst that old (``redis_ttl_s``).

Redis may lose its last second of writes in a power cut (``appendfsync everysec``), leaving an
older value that no later write replaces until the key's next change or its TTL. Aggregators keep
a *mark* per partition (``tc:mark:<name>``, no TTL), advanced after each put by the same script:
the version up to which every put under the mark is in Redis. Redis's persistence keeps a prefix
of its writes (the AOF is replayed up to where it was cut, an incomplete MULTI dropped), so after
a restart the mark it holds still vouches for every write before it, and a mark found below what
the aggregator set tells it which puts to make again (``tally.workers.partitions``). A put whose
mark is found behind leaves it there, so no later put hides the loss. A Redis Cluster spreads the
keys of one put over nodes that restart apart: no one mark can vouch for them (``mark`` is None).

Redis is optional on the read path: ``TieredCounts`` answers from PostgreSQL when Redis fails or
is slow (short socket timeouts), and a circuit breaker then skips Redis for a couple of seconds
so reads do not each pay the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError

from tally.core.breaker import Breaker
from tally.core.coalesce import Batch
from tally.core.errors import Unavailable
from tally.core.model import CountKey
from tally.store.ports import CountStore

log = logging.getLogger("tally.redis")

# KEYS[1]; ARGV: version, count, ttl seconds. Writes unless the stored version is newer.
_CAS = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local v = tonumber(string.match(cur, '^(%d+):'))
  if v and v > tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. ARGV[2], 'EX', ARGV[3])
return 1
"""

# The same for many keys in one call (a single server: keys of any slot). ARGV: version, ttl
# seconds, mark floor (-1: no mark), then one count per key. With a mark, its key is the last of
# KEYS: after the counts, the mark goes up to the version unless it was found below the floor
# (Redis lost puts made under it). Returns the mark as found (-1: none), or -1 without a mark.
_CAS_MANY = """
local version, floor = tonumber(ARGV[1]), tonumber(ARGV[3])
local n, found = #KEYS, -1
if floor >= 0 then
  n = n - 1
  found = tonumber(redis.call('GET', KEYS[#KEYS])) or -1
end
for i = 1, n do
  local cur = redis.call('GET', KEYS[i])
  local v = cur and tonumber(string.match(cur, '^(%d+):'))
  if not (v and v > version) then
    redis.call('SET', KEYS[i], ARGV[1] .. ':' .. ARGV[i + 3], 'EX', ARGV[2])
  end
end
if floor >= 0 and (found < 0 or found >= floor) and found < version then
  redis.call('SET', KEYS[#KEYS], ARGV[1])
end
return found
"""
# The read path's fill: each key set to "0:<count>" with a TTL, only where absent. ARGV: ttl
# seconds, then one count per key. One call for a feed's misses, where a pipeline of a SET per key
# cost the API process a command built in Python per key.
_FILL = """
for i, key in ipairs(KEYS) do
  redis.call('SET', key, '0:' .. ARGV[i + 1], 'EX', ARGV[1], 'NX')
end
return #KEYS
"""
MARK_PREFIX = "tc:mark:"
PUT_CHUNK = 500  # keys per script call: one call holds the server for its whole run


def count_key(key: CountKey) -> str:
    counter, item = key
    return f"tc:{{{item}}}:{counter}"


def _parse(raw: bytes | str | None) -> int | None:
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else raw
    return int(text.partition(":")[2])


class RedisCounts:
    """Absolute counts with a version guard; one round trip (per node) for a batch."""

    def __init__(self, url: str, cluster: bool = False, ttl_s: int = 3600,
                 timeout_s: float = 0.25) -> None:
        self.url = url
        self.cluster = cluster
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._r: Any = None
        self._put_many: Any = None
        self._fill: Any = None

    async def start(self) -> None:
        opts: dict[str, Any] = {"socket_timeout": self.timeout_s,
                                "socket_connect_timeout": self.timeout_s}
        if self.cluster:
            self._r = RedisCluster.from_url(self.url, **opts)
            try:  # learn the slot map now; if Redis is down, the first command retries it
                await self._r.initialize()
            except (RedisError, OSError) as exc:
                log.warning("redis cluster unreachable at start; reads use PostgreSQL meanwhile",
                            extra={"error": repr(exc)})
        else:
            self._r = Redis.from_url(self.url, health_check_interval=30, **opts)

    @property
    def client(self) -> Any:
        """The connected client (after ``start``), for the shared rate-limit buckets."""
        if self._r is None:
            raise ConnectionError("Redis client not started")
        return self._r

    async def close(self) -> None:
        if self._r is not None:
            await self._r.aclose()
            self._r = self._put_many = self._fill = None

    async def ping(self) -> bool:
        return bool(await self._r.ping())

    async def get(self, keys: Sequence[CountKey]) -> dict[CountKey, int]:
        """Counts present in Redis (missing keys are absent from the result); raises on failure."""
        if not keys:
            return {}
        names = [count_key(k) for k in keys]
        raw = await (self._r.mget_nonatomic(names) if self.cluster else self._r.mget(names))
        out = {}
        for key, value in zip(keys, raw, strict=True):
            parsed = _parse(value)
            if parsed is not None:
                out[key] = parsed
        return out

    async def put(self, counts: Mapping[CountKey, int], version: int, mark: str | None = None,
                  floor: int = 0) -> bool:
        """Absolute counts from an aggregator; a key holding a newer version is left alone.

        With ``mark``, then advances that mark to ``version``, unless Redis holds it below
        ``floor`` (the caller's last mark): then returns False and leaves the mark where it is.
        Raises ``Unavailable`` when Redis fails: the aggregator keeps the values and retries."""
        try:
            if self.cluster:  # keys of many slots: one script call per key, pipelined per node
                if counts:
                    pipe = self._r.pipeline(transaction=False)
                    for key, value in counts.items():
                        pipe.eval(_CAS, 1, count_key(key), version, value, self.ttl_s)
                    await pipe.execute()
                return True
            # One script call per chunk of keys: a round of the aggregator is one or a few
            # commands, not one per count (EVALSHA: the script is sent once). The mark goes with
            # the last chunk: every earlier chunk is before it in Redis's log.
            if self._put_many is None:
                self._put_many = self._r.register_script(_CAS_MANY)
            items = list(counts.items())
            found = -1
            for start in range(0, max(len(items), 1), PUT_CHUNK):
                chunk = items[start:start + PUT_CHUNK]
                marked = [MARK_PREFIX + mark] if mark and start + PUT_CHUNK >= len(items) else []
                if not chunk and not marked:
                    break
                keys = [count_key(k) for k, _ in chunk] + marked
                found = int(await self._put_many(keys=keys, args=[
                    version, self.ttl_s, floor if marked else -1, *(v for _, v in chunk)]))
            return not (mark is not None and 0 <= found < floor)
        except RedisError as exc:
            raise Unavailable(f"redis: {exc!r}") from exc

    async def mark(self, name: str) -> int | None:
        """The version up to which Redis holds every put made under mark ``name`` (None: no such
        mark, or a Redis Cluster, which keeps none). Raises ``Unavailable`` when Redis fails."""
        if self.cluster:
            return None
        try:
            raw = await self._r.get(MARK_PREFIX + name)
        except RedisError as exc:
            raise Unavailable(f"redis: {exc!r}") from exc
        return None if raw is None else int(raw)

    async def fill(self, counts: Mapping[CountKey, int]) -> None:
        """Read-path fill from PostgreSQL: version 0, only where no value exists."""
        if not counts:
            return
        if self.cluster:  # keys of many slots: a SET per key, pipelined per node
            pipe = self._r.pipeline(transaction=False)
            for key, value in counts.items():
                pipe.set(count_key(key), f"0:{value}", ex=self.ttl_s, nx=True)
            await pipe.execute()
            return
        if self._fill is None:
            self._fill = self._r.register_script(_FILL)
        items = list(counts.items())
        for start in range(0, len(items), PUT_CHUNK):
            chunk = items[start:start + PUT_CHUNK]
            await self._fill(keys=[count_key(k) for k, _ in chunk],
                             args=[self.ttl_s, *(v for _, v in chunk)])

    async def delete(self, keys: Sequence[CountKey]) -> None:
        """After a repair changed counts in PostgreSQL without a new stream version."""
        if keys:
            pipe = self._r.pipeline(transaction=False)
            for key in keys:
                pipe.delete(count_key(key))
            await pipe.execute()


class TieredCounts:
    """A CountStore for the read path: Redis first, PostgreSQL for misses and when Redis is out.

    Everything but ``get`` goes straight to the durable store.
    """

    def __init__(self, redis: RedisCounts, durable: CountStore, breaker: Breaker | None = None,
                 ) -> None:
        self.redis = redis
        self.durable = durable
        self.breaker = breaker or Breaker(threshold=1, cooldown_s=2.0)
        self.hits = 0
        self.misses = 0
        self.fallbacks = 0  # batches served without Redis (error, timeout or open breaker)
        self._fills: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.redis.start()

    async def close(self) -> None:
        for task in list(self._fills):
            task.cancel()
        await asyncio.gather(*self._fills, return_exceptions=True)
        await self.redis.close()

    async def get(self, keys: Sequence[CountKey]) -> dict[CountKey, int]:
        found: dict[CountKey, int] = {}
        if self.breaker.allow():
            try:
                found = await asyncio.wait_for(self.redis.get(keys), self.redis.timeout_s * 2)
                self.breaker.success()
            except (RedisError, OSError, TimeoutError) as exc:
                self.breaker.failure()
                self.fallbacks += 1
                log.warning("redis read failed; answering from PostgreSQL",
                            extra={"error": repr(exc), "keys": len(keys)})
        else:
            self.fallbacks += 1
        missing = [k for k in keys if k not in found]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            durable = await self.durable.get(missing)
            found.update(durable)
            if not self.breaker.is_open and len(self._fills) < 64:
                self._fill({k: durable.get(k, 0) for k in missing})
        return found

    def _fill(self, counts: dict[CountKey, int]) -> None:
        async def run() -> None:
            try:
                await self.redis.fill(counts)
            except (RedisError, OSError, TimeoutError):
                self.breaker.failure()

        task = asyncio.create_task(run())
        self._fills.add(task)
        task.add_done_callback(self._fills.discard)

    async def watermarks(self, consumer: str) -> dict[str, int]:
        return await self.durable.watermarks(consumer)

    async def apply_batch(self, batch: Batch, consumer: str,
                          expect: Mapping[str, int]) -> dict[CountKey, int] | None:
        """Through the durable store, then drop the keys from Redis (the next read refills).

        The aggregators do not come this way: they know the log position of a batch and write
        the new values with it as the version (``RedisCounts.put``), which no stale fill beats.
        """
        new = await self.durable.apply_batch(batch, consumer, expect)
        if new:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await self.redis.delete(list(new))
        return new

    async def rollups(self, counter: str, item_type: str, dimension: str) -> dict[str, int]:
        return await self.durable.rollups(counter, item_type, dimension)
