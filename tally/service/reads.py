"""The read path: in-process cache, then the count store, one round trip per batch.

Concurrent misses for one key are coalesced into one fetch (single flight), so a viral item that
falls out of the cache costs one backend read however many requests want it at that moment.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Sequence

from tally.core.hotkeys import SpaceSaving
from tally.core.lru import LRU
from tally.core.model import CountKey
from tally.store.ports import CountStore

# One read in this many, at random, feeds the hot-item sketch (weighted by it): a viral key still
# dominates the sketch, at a fraction of the cost per read.
HOT_SAMPLE = 8
# Where the sketch decides no caching and only reports (``/v1/admin/hot``, the hot-item gauges):
# the embedded first process, whose cache the aggregator writes through. Fewer reads feed it
# there; a feed costs about six sketch updates at one in eight, and a viral item is still sampled
# thousands of times between two decays at a few hundred feeds a second.
REPORT_SAMPLE = 32


class CountReader:
    def __init__(self, store: CountStore, cache: LRU[CountKey, int], hot: SpaceSaving,
                 cache_all: bool = True, hot_ttl_s: float = 0.25, hot_share: float = 0.01,
                 sample: int = 1) -> None:
        """``cache_all``: the aggregator writes through to this cache (embedded mode), so every
        key may be cached for the cache's TTL; otherwise only hot keys are, for ``hot_ttl_s``."""
        self.store = store
        self.cache = cache
        self.hot = hot
        self.cache_all = cache_all
        self.hot_ttl_s = hot_ttl_s
        self.hot_share = hot_share
        self._inflight: dict[CountKey, asyncio.Future[dict[CountKey, int]]] = {}
        self.coalesced = 0
        # Sampling: a viral key still dominates the sketch, at 1/sample of the cost per read.
        self.sample = sample
        self._rng = random.Random()
        self._next_sampled = self._gap() if sample > 1 else 0  # reads to skip before the next
        self._hot_total = -1  # the sketch's total when ``_hot`` was worked out
        self._hot: frozenset[str] = frozenset()

    async def get(self, keys: Sequence[CountKey]) -> list[int]:
        """Each key's count, in the order asked (0 for a key never counted). A list, not a
        mapping: a feed's fifty answers go straight into its response by position."""
        self._feed_sketch(keys)
        values = self.cache.get_many(keys) if self.cache_all else self._cached_hot(keys)
        if None not in values:
            return values  # type: ignore[return-value]  # every key was cached
        missing = [n for n, value in enumerate(values) if value is None]
        inflight = self._inflight
        mine: list[CountKey] = []
        waits: dict[CountKey, asyncio.Future[dict[CountKey, int]]] = {}
        for n in missing:
            key = keys[n]
            if (fut := inflight.get(key)) is not None:
                waits[key] = fut
            else:
                mine.append(key)
        got = await self._fetch(mine) if mine else {}
        for n in missing:
            key = keys[n]
            if (fut := waits.get(key)) is None:
                values[n] = got[key]
            else:
                self.coalesced += 1
                values[n] = (await fut)[key]
        return values  # type: ignore[return-value]  # every None was filled

    def _cached_hot(self, keys: Sequence[CountKey]) -> list[int | None]:
        """Without write-through only hot items are ever cached (``_remember``), so only keys of
        items hot now are looked up: a set lookup each, where the cache's costs a hash, a shard
        and a dict lookup, and of a feed's fifty keys few are hot. (A key cached while hot and
        no longer hot is read from the store instead: fresher, never staler.)"""
        hot = self._hot_items()
        values: list[int | None] = [None] * len(keys)
        wanted = [n for n, key in enumerate(keys) if key[1] in hot] if hot else []
        if wanted:
            for n, value in zip(wanted, self.cache.get_many([keys[n] for n in wanted]),
                                strict=True):
                values[n] = value
        self.cache.misses += len(keys) - len(wanted)  # not looked up: missed all the same
        return values

    def _hot_items(self) -> frozenset[str]:
        """The items hot now, worked out again only when the sketch has changed since."""
        if self.hot.total != self._hot_total:
            self._hot_total = self.hot.total
            self._hot = self.hot.hot_items(self.hot_share)
        return self._hot

    def _gap(self) -> int:
        return int(math.log(1.0 - self._rng.random()) / math.log(1.0 - 1.0 / self.sample))

    def _feed_sketch(self, keys: Sequence[CountKey]) -> None:
        """Each read joins the sketch with probability 1/sample, weighted by sample. Drawn as
        the gap to the next sampled read (geometric), not a coin per key: a feed reads fifty
        keys and samples about six."""
        if self.sample == 1:
            for key in keys:
                self.hot.add(key[1])
            return
        i, n = self._next_sampled, len(keys)
        while i < n:
            self.hot.add(keys[i][1], self.sample)
            i += 1 + self._gap()
        self._next_sampled = i - n

    async def _fetch(self, keys: list[CountKey]) -> dict[CountKey, int]:
        """One store read for ``keys``; who wants one of them meanwhile waits for this read (one
        future for the batch, whose result holds every key's count, instead of one per key)."""
        batch: asyncio.Future[dict[CountKey, int]] = asyncio.get_running_loop().create_future()
        unique = dict.fromkeys(keys, batch)
        self._inflight.update(unique)
        try:
            found = await self.store.get(list(unique))
        except BaseException as exc:
            batch.set_exception(exc)
            batch.exception()  # mark retrieved: the caller below re-raises it
            raise
        finally:
            for k in unique:
                self._inflight.pop(k, None)
        result = {key: found.get(key, 0) for key in unique}
        batch.set_result(result)
        self._remember(result)
        return result

    def _remember(self, counts: dict[CountKey, int]) -> None:
        if self.cache_all:
            self.cache.put_if_absent(counts)
            return
        hot = self._hot_items()
        for key, value in counts.items():
            if key[1] in hot:
                self.cache.put(key, value, ttl_s=self.hot_ttl_s)

    def applied(self, counts: dict[CountKey, int]) -> None:
        """New absolute counts from the aggregator: refresh the cached ones (embedded) or drop
        stale copies. Keys neither cached nor being fetched are left out: nobody read them
        lately, and caching every applied key cost a cache insert and an eviction per liked
        item on the event loop. A key being fetched is written, so the fetch (which may have
        read the table before this commit) cannot cache an older value over it."""
        cache, inflight = self.cache, self._inflight
        for key, value in counts.items():
            if not self.cache_all:
                cache.discard(key)
            elif key in cache or key in inflight:
                cache.put(key, value)

    def forget(self, keys: Sequence[CountKey]) -> None:
        for key in keys:
            self.cache.discard(key)
