"""The shard map: stable hashing, range parsing and validation."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tally.core.errors import ConfigError
from tally.settings import Settings
from tally.store.shards import ShardMap, even_split, logical_shard, parse_ranges


def test_hash_is_stable_across_processes() -> None:
    here = [logical_shard(f"user{i}", 4096) for i in range(50)]
    code = ("from tally.store.shards import logical_shard;"
            "print([logical_shard(f'user{i}', 4096) for i in range(50)])")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": "12345"}).stdout
    assert str(here) == there.strip()


def test_hash_has_fixed_known_values() -> None:
    # Pinned: a change here would move every stored row to another shard.
    assert [logical_shard(k, 4096) for k in ("1", "alice", "post:42")] == [1910, 2697, 904]
    assert logical_shard("alice", 1) == 0


def test_hash_spreads_evenly() -> None:
    counts = [0] * 16
    for i in range(16_000):
        counts[logical_shard(str(i), 16)] += 1
    assert min(counts) > 800 and max(counts) < 1200


def test_even_split_is_contiguous_and_balanced() -> None:
    table = even_split(4096, 3)
    assert table == sorted(table)
    assert {table.count(db) for db in range(3)} <= {1365, 1366}


def test_ranges_map_every_shard_once() -> None:
    table = parse_ranges(["0-9=1", "10-15=0"], 16, 2)
    assert table == [1] * 10 + [0] * 6
    sm = ShardMap.build(16, 2, ["0-9=1", "10-15=0"])
    assert sm.ranges() == ["0-9=1", "10-15=0"]
    assert sm.shards_of_db(0) == list(range(10, 16))


@pytest.mark.parametrize("ranges, message", [
    (["0-9=0"], "not mapped"),
    (["0-9=0", "9-15=1"], "mapped twice"),
    (["0-15=2"], "database index"),
    (["0-16=0"], "FIRST <= LAST"),
    (["5-3=0", "0-15=1"], "FIRST <= LAST"),
    (["zero-15=0"], "FIRST-LAST=DB_INDEX"),
])
def test_bad_maps_are_rejected(ranges: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ShardMap.build(16, 2, ranges)


def test_group_keeps_input_order_per_database() -> None:
    sm = ShardMap.build(64, 2)
    users = [f"u{i}" for i in range(40)]
    groups = sm.group(users, lambda u: u)
    assert sorted(u for g in groups.values() for u in g) == sorted(users)
    for db, members in groups.items():
        assert members == [u for u in users if sm.db_of(u) == db]


def test_settings_validate_the_shard_map() -> None:
    with pytest.raises(ConfigError, match="not mapped"):
        Settings().replace(backend="cluster", postgres_dsns=["postgresql://a", "postgresql://b"],
                           logical_shards=16, shard_map=["0-3=0"])
    ok = Settings().replace(backend="cluster", postgres_dsns=["postgresql://a"], logical_shards=16,
                            shard_map=["0-15=0"])
    assert ok.shard_map == ["0-15=0"]


def test_a_database_may_hold_no_shards_until_a_move_fills_it() -> None:
    sm = ShardMap.build(16, 3, ["0-15=0"])  # database 2 just added, database 1 emptied
    assert sm.shards_of_db(1) == [] and sm.shards_of_db(2) == []
    moved = sm.moved(4, 7, 2)
    assert moved.ranges() == ["0-3=0", "4-7=2", "8-15=0"]
    assert sm.ranges() == ["0-15=0"]  # the original is unchanged
    assert moved.owned(2) == [(4, 7)]
    assert moved.not_owned(0) == [(4, 7)]
    assert moved.not_owned(2) == [(0, 3), (8, 15)]
    assert moved.not_owned(1) == [(0, 15)]
