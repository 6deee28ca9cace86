"""The count cache: size bound, time to live, put_if_absent, hit and miss accounting."""

from __future__ import annotations

from tally.core.lru import LRU


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_size_bound_evicts_least_recently_used() -> None:
    c: LRU[str, int] = LRU(2, 10.0, Clock())
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1  # a is now the most recent
    c.put("c", 3)
    assert (len(c), c.get("b"), c.get("a"), c.get("c")) == (2, None, 1, 3)
    assert (c.hits, c.misses) == (3, 1)


def test_ttl() -> None:
    clock = Clock()
    c: LRU[str, int] = LRU(10, 5.0, clock)
    c.put("a", 1)
    c.put("b", 2, ttl_s=1.0)
    clock.now = 1.5
    assert (c.get("a"), c.get("b")) == (1, None)
    clock.now = 5.5
    assert c.get("a") is None
    assert len(c) == 0  # expired entries are dropped when found


def test_put_if_absent_keeps_a_fresher_value() -> None:
    clock = Clock()
    c: LRU[str, int] = LRU(10, 5.0, clock)
    c.put("a", 2)  # written by the aggregator
    c.put_if_absent({"a": 1})  # an older read finishing late
    assert c.get("a") == 2
    c.put_if_absent({"b": 7, "c": 8})
    assert c.get("b") == 7 and c.get("c") == 8
    clock.now = 6.0
    c.put_if_absent({"a": 3})  # the old entry expired: the read is fresher
    assert c.get("a") == 3
    small: LRU[str, int] = LRU(2, 5.0, clock)
    small.put_if_absent({"x": 1, "y": 2, "z": 3})
    assert len(small) == 2 and small.get("x") is None and small.get("z") == 3
    c.discard("a")
    c.discard("missing")
    assert c.get("a") is None
    c.clear()
    assert len(c) == 0


def test_a_large_cache_is_sharded_and_keeps_its_bound_and_recent_keys() -> None:
    from tally.core.lru import SHARD_ENTRIES

    size = 8 * SHARD_ENTRIES
    c: LRU[int, int] = LRU(size, 60.0)
    assert len(c._shards) > 1
    for k in range(size):
        c.put(k, k)
    assert len(c) == size
    hot = range(0, size, 97)
    for k in hot:
        assert c.get(k) == k  # touched: most recent in its shard
    for k in range(size, 2 * size - size // 2):
        c.put(k, k)
    assert len(c) == size
    assert all(k in c for k in hot)
    assert c.get(1) is None  # the oldest untouched key: evicted


def test_get_many_is_get_of_each_key() -> None:
    clock = Clock()
    c: LRU[str, int] = LRU(3, 5.0, clock)
    c.put("a", 1)
    c.put("b", 2, ttl_s=1.0)
    c.put("c", 3)
    clock.now = 1.5
    assert c.get_many(["a", "b", "x", "a"]) == [1, None, None, 1]
    assert (c.hits, c.misses, "b" in c) == (2, 2, False)  # the expired entry is dropped
    c.put("d", 4)
    c.put("e", 5)  # over the bound: "c" goes, the least recently used ("a" was read since)
    assert c.get_many(["c", "a", "d", "e"]) == [None, 1, 4, 5]
