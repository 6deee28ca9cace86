"""The data-growth loader writes what the service itself would have: records and counts agree,
and a server started on the loaded database counts on from them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import asyncpg
import httpx
import pytest

from tally.store.postgres.schema import migrate
from tally.store.shards import ShardMap
from tally_dev.bench import grow_cluster
from tally_dev.bench.grow import disk_bytes, markdown, preload
from tally_dev.bench.workloads import Params
from tests.conftest import ServerFactory
from tests.helpers import recount, stored


def test_preloaded_likes_are_records_with_matching_counts(tmp_path: Path,
                                                          server_factory: ServerFactory) -> None:
    db = tmp_path / "data" / "tally.db"
    preload(db, 3000, Params(items=50), chunk=700)
    counts = stored(db)
    assert sum(counts.values()) == 3000 and counts == recount(db)
    assert disk_bytes(db) > 0
    item, n = max(counts.items(), key=lambda kv: kv[1])
    server = server_factory(db.parent).start()
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v1/like", json={"user_id": 1, "item_type": "post",
                                     "item_id": item[1].split(":")[1]})
        assert r.status_code == 200 and r.json()["count"] == n + 1


def test_the_table_compares_each_size_with_the_empty_database_measured_alike() -> None:
    """First seconds with first seconds, warm with warm: a cold large store beside a warm empty
    one would blame the size for the start."""
    def measured(per_s: float, feed_p99: float) -> dict[str, object]:
        cpu = {"server": 150.0, "children": 100.0}
        return {"uniform": {"per_s": per_s, "p99_ms": 9.0, "cpu_us_per_op": cpu},
                "feed": {"per_s": 500.0, "p99_ms": feed_p99, "cpu_us_per_op": cpu}}

    def row(likes: int, cold: float, warm: float, feed_p99: float) -> dict[str, object]:
        return {"likes": likes, "bytes_per_like": 60.0 if likes else None,
                **measured(cold, feed_p99), "warm": measured(warm, feed_p99 / 2)}

    table = markdown([row(0, 1000.0, 1000.0, 20.0), row(1_000_000, 600.0, 900.0, 50.0)])
    assert ("| 1,000,000 | first seconds | 60.0 | 600 (9.0) (60% of empty) | 150 / 100 | "
            "500 (50.0) (2.5x empty) | 150 |") in table
    assert ("| 1,000,000 | after warm-up | 60.0 | 900 (9.0) (90% of empty) | 150 / 100 | "
            "500 (25.0) (2.5x empty) | 150 |") in table
    assert "| 0 | after warm-up | - | 1,000 (9.0) |" in table
    only_cold = markdown([{k: v for k, v in row(0, 1.0, 1.0, 1.0).items() if k != "warm"}])
    assert "after warm-up" not in only_cold


@pytest.mark.integration
@pytest.mark.anyio
async def test_cluster_preload_places_records_and_counts_by_the_shard_map(
        pg_database: Callable[[], str]) -> None:
    """Records by the user's logical shard, counts by the item's, in the database the service's
    own map routes each to; every count equals its records."""
    dsns = [pg_database(), pg_database()]
    for n, dsn in enumerate(dsns):
        conn = await asyncpg.connect(dsn)
        await migrate(conn, n)
        await conn.close()
    await grow_cluster.preload(dsns, 3000, shards=64, params=Params(items=50), chunk=700)
    smap = ShardMap.build(64, 2)
    per_item: Counter[str] = Counter()
    counts: dict[str, int] = {}
    for n, dsn in enumerate(dsns):
        conn = await asyncpg.connect(dsn)
        for user, item, shard, state in await conn.fetch(
                "SELECT user_id, item, shard, state FROM toggles"):
            assert state and shard == smap.shard_of(user) and smap.db_of_shard(shard) == n
            per_item[item] += 1
        for item, count in await conn.fetch("SELECT item, count FROM counts"):
            assert smap.db_of(item) == n
            counts[item] = count
        assert await conn.fetchval("SELECT count(*) FROM pg_indexes "
                                   "WHERE indexname = 'toggles_on_by_item'") == 1
        await conn.close()
    assert sum(per_item.values()) == 3000 and counts == dict(per_item)


def test_each_size_is_measured_at_start_and_after_the_warm_up(tmp_path: Path) -> None:
    """The whole command on tiny sizes: both measurements of each size are real runs with
    answered likes and feeds, and the warm-up runs are kept in the record, named as such."""
    from tally_dev.bench.grow import run

    result = run([0, 2000], tmp_path / "out", duration_s=0.5, show_progress=False, warm_s=1.0)
    rows = result["rows"]
    assert [r["likes"] for r in rows] == [0, 2000]
    for r in rows:
        for measured in (r, r["warm"]):
            assert measured["uniform"]["per_s"] > 0 and measured["feed"]["per_s"] > 0
    names = [run_["name"] for run_ in result["runs"]]
    assert names.count("tally/uniform warm-up 0.5 s") == 2 and "tally/feed warm" in names
    table = (tmp_path / "out" / "grow.md").read_text()
    assert "| 2,000 | after warm-up |" in table and "| 2,000 | first seconds |" in table
