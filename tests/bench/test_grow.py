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


def test_the_table_compares_each_size_with_the_empty_database() -> None:
    def row(likes: int, per_s: float) -> dict[str, object]:
        cpu = {"server": 150.0, "children": 100.0}
        return {"likes": likes, "bytes_per_like": 60.0 if likes else None,
                "uniform": {"per_s": per_s, "p99_ms": 9.0, "cpu_us_per_op": cpu},
                "feed": {"per_s": 500.0, "p99_ms": 20.0, "cpu_us_per_op": cpu}}

    table = markdown([row(0, 1000.0), row(1_000_000, 800.0)])
    assert "| 1,000,000 | 60.0 | 800 (9.0) (80% of empty) | 150 / 100 |" in table


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
