"""PostgreSQL-only behaviour: cross-database batches survive a crash between their two steps,
reads are one query per database, the durable setting is in force, the shard map is enforced."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

from tally.core.coalesce import Batch, coalesce
from tally.core.errors import ConfigError, Unavailable
from tally.core.model import Event
from tally.store.postgres.cluster import PgCluster
from tally.store.postgres.counts import PostgresCountStore
from tally.store.shards import ShardMap

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def spanning_events(shard_map: ShardMap, n: int = 40) -> list[Event]:
    evs = [Event(seq=i + 1, counter="like", item=f"post:{i}", user="u", delta=1, ts=time.time(),
                 region="eu", source="pg0.0") for i in range(n)]
    assert {shard_map.db_of(e.item) for e in evs} == {0, 1}
    return evs


async def crash_before_roll_forward(store: PostgresCountStore, batch: Batch,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Applies ``batch`` as a process that dies between its two steps: the decision is committed,
    the roll-forward to database 1 fails, and the intent is left for the next owner to finish.
    The store's own roll-forward is back in place when this returns."""

    async def unreachable(*args: object) -> None:
        raise Unavailable("database 1 went away")

    with monkeypatch.context() as m:
        m.setattr(store, "_roll_forward", unreachable)
        with pytest.raises(Unavailable):
            await store.apply_batch(batch, "p1", {})


@pytest.fixture
async def stores(pg_shared_dsns: list[str]) -> Any:
    shard_map = ShardMap.build(64, 2)
    made: list[PostgresCountStore] = []

    async def make() -> PostgresCountStore:
        store = PostgresCountStore(PgCluster(pg_shared_dsns, shard_map, pool_max=4))
        await store.start()
        made.append(store)
        return store

    yield make, shard_map
    for store in made:
        await store.close()


async def test_crash_between_decision_and_roll_forward(stores: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    make, shard_map = stores
    crashed, other = await make(), await make()
    evs = spanning_events(shard_map)
    keys = [("like", e.item) for e in evs]

    await crash_before_roll_forward(crashed, coalesce(evs), monkeypatch)
    half = await other.get(keys)
    assert set(half.values()) == {1} and {shard_map.db_of(i) for _, i in half} == {0}
    # Another process takes over the consumer: its first read of the watermarks finishes the batch.
    marks = await other.watermarks("p1")
    assert marks == {"pg0.0": 40} and other.rolled_forward == 1
    assert await other.get(keys) == dict.fromkeys(keys, 1)
    redelivered = coalesce(evs, applied=marks)
    assert (redelivered.events, redelivered.skipped) == (0, 40)
    # A late roll-forward of the same intent (the crashed process waking up) applies nothing.
    parts = {1: [("like", e.item, 1) for e in evs if shard_map.db_of(e.item) == 1]}
    assert await crashed._roll_forward("p1", 1, parts) == {}
    assert await other.get(keys) == dict.fromkeys(keys, 1)


async def test_pending_intent_is_finished_before_the_next_batch(stores: Any,
                                                                monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    make, shard_map = stores
    store = await make()
    evs = spanning_events(shard_map)

    await crash_before_roll_forward(store, coalesce(evs[:20]), monkeypatch)
    nxt = coalesce(evs[20:], applied={"pg0.0": 20})
    got = await store.apply_batch(nxt, "p1", {"pg0.0": 20})
    assert got is not None and store.rolled_forward == 1
    assert await store.get([("like", e.item) for e in evs]) == {("like", e.item): 1 for e in evs}


async def test_concurrent_takeovers_roll_forward_once(stores: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    make, shard_map = stores
    crashed = await make()
    evs = spanning_events(shard_map)

    await crash_before_roll_forward(crashed, coalesce(evs), monkeypatch)
    takers = [await make() for _ in range(3)]
    await asyncio.gather(*(t.watermarks("p1") for t in takers))
    assert await takers[0].get([("like", e.item) for e in evs]) == {
        ("like", e.item): 1 for e in evs}


async def test_batch_reads_are_one_query_per_database(stores: Any) -> None:
    make, _ = stores
    store = await make()
    calls: list[int] = []
    fetch = store.cluster.fetch

    async def counting(db: int, sql: str, *args: Any) -> list[asyncpg.Record]:
        calls.append(db)
        rows: list[asyncpg.Record] = await fetch(db, sql, *args)
        return rows

    store.cluster.fetch = counting  # type: ignore[method-assign,unused-ignore]
    await store.get([("like", f"post:{i}") for i in range(200)] + [("view", "post:1")])
    assert sorted(calls) == [0, 1]


async def test_durable_commit_setting_is_in_force(pg_shared_dsns: list[str]) -> None:
    cluster = PgCluster(pg_shared_dsns, ShardMap.build(64, 2))
    await cluster.start()
    try:
        for db in (0, 1):
            rows = await cluster.fetch(db, "SELECT current_setting('synchronous_commit'), "
                                           "current_setting('fsync')")
            assert tuple(rows[0]) == ("on", "on")
    finally:
        await cluster.close()


async def test_reordered_databases_are_refused(pg_shared_dsns: list[str]) -> None:
    first = PgCluster(pg_shared_dsns, ShardMap.build(64, 2))
    await first.start()
    await first.close()
    swapped = PgCluster(list(reversed(pg_shared_dsns)), ShardMap.build(64, 2))
    with pytest.raises(ConfigError, match="must not change"):
        await swapped.start()
    with pytest.raises(ConfigError, match="2 postgres_dsns"):
        PgCluster(pg_shared_dsns, ShardMap.build(64, 3))


async def test_stores_built_from_settings_share_one_cluster(pg_shared_dsns: list[str]) -> None:
    from tally.core.model import ToggleOp
    from tally.runtime import postgres_config
    from tally.settings import Settings
    from tally.store.postgres.build import build_postgres

    settings = Settings().replace(backend="cluster", postgres_dsns=pg_shared_dsns,
                                  logical_shards=128, outbox_slots=2, postgres_pool_max=3)
    stores = build_postgres(postgres_config(settings))
    assert stores.likes.cluster is stores.counts.cluster is stores.recounter.cluster
    await stores.start()
    try:
        res = await stores.likes.write([ToggleOp("like", "post:1", "u1", True, "eu")])
        assert res[0].changed and len(stores.likes.sources()) == 4
        assert stores.cluster.pools[0].get_max_size() == 3
    finally:
        await stores.close()
    with pytest.raises(ConfigError, match="synchronous_commit"):
        settings.replace(postgres_synchronous_commit="sometimes")


async def test_single_write_answer_with_counts_here_or_elsewhere(pg_shared_dsns: list[str]) -> None:
    """The one-statement write reads the count itself when the item lives in the user's database,
    else it is read just before; either way the answer is the applied count plus this change."""
    from tally.core.model import ToggleOp
    from tally.store.postgres.build import PostgresConfig, build_postgres

    stores = build_postgres(PostgresConfig(pg_shared_dsns, logical_shards=64))
    await stores.start()
    try:
        item, sm = "post:7", stores.cluster.map
        likers = [f"u{i}" for i in range(10)]
        await stores.likes.write([ToggleOp("like", item, u, True, "eu") for u in likers])
        evs = [e for s in stores.likes.sources() for e in await stores.likes.pending(s, 0, 100)]
        assert await stores.counts.apply_batch(coalesce(evs), "c", {}) is not None
        fresh = [f"v{i}" for i in range(40)]
        here = next(u for u in fresh if sm.db_of(u) == sm.db_of(item))
        there = next(u for u in fresh if sm.db_of(u) != sm.db_of(item))
        for user in (here, there):  # applied 10, plus this like
            res = await stores.likes.write([ToggleOp("like", item, user, True, "eu")])
            assert (res[0].changed, res[0].count) == (True, 11)
        for user in (next(u for u in likers if sm.db_of(u) == sm.db_of(item)),
                     next(u for u in likers if sm.db_of(u) != sm.db_of(item))):
            res = await stores.likes.write([ToggleOp("like", item, user, False, "eu")])
            assert (res[0].changed, res[0].count) == (True, 9)
    finally:
        await stores.close()


async def test_concurrent_single_likes_share_transactions(pg_shared_dsns: list[str]) -> None:
    """Group commit: concurrent single likes go in fewer transactions than likes, each caller gets
    its own answer, repeats of one (user, item) follow the toggle rule in arrival order, and the
    outbox holds exactly one row per real change."""
    from tally.core.model import ToggleOp
    from tally.store.postgres.build import PostgresConfig, build_postgres

    stores = build_postgres(PostgresConfig(pg_shared_dsns, logical_shards=64))
    await stores.start()
    try:
        likes = stores.likes
        assert likes.group is not None
        item = f"post:gc{time.time_ns()}"
        users = [f"g{i}" for i in range(60)]
        # The same user's like, like again (no change), unlike, like: four calls in one burst.
        repeats = [True, True, False, True]
        calls = [ToggleOp("like", item, u, True, "eu") for u in users]
        calls += [ToggleOp("like", item, "g-repeat", on, "eu") for on in repeats]
        results = await asyncio.gather(*(likes.write([op]) for op in calls))
        assert likes.group.batches < likes.group.ops == len(calls)
        assert all(r[0].changed and r[0].state for r in results[:len(users)])
        assert [r[0].changed for r in results[len(users):]] == [True, False, True, True]
        assert all(r[0].seq for r in results if r[0].changed)
        rows = [e for s in likes.sources() for e in await likes.pending(s, 0, 1000)
                if e.item == item]
        assert len(rows) == len(users) + 3 and sum(e.delta for e in rows) == len(users) + 1
        assert await likes.has("like", "g-repeat", [item]) == [True]
    finally:
        await stores.close()


def follows_the_toggle_rule(results: list[Any], before: list[bool], wanted: list[bool]
                            ) -> list[int]:
    """Asserts that each answer is what tally.core.toggle's rule says of a toggle from ``before``
    to ``wanted``, its count this request's own deltas so far (nothing is applied yet); returns
    the deltas."""
    from tally.core.toggle import step

    deltas = [step(was, on) for was, on in zip(before, wanted, strict=True)]
    assert [r.changed for r in results] == [d != 0 for d in deltas]
    assert [r.state for r in results] == wanted
    running = [sum(deltas[:n + 1]) for n in range(len(deltas))]
    assert [r.count for r in results] == [max(x, 0) for x in running]
    return deltas


async def test_distinct_toggles_of_one_database_follow_the_toggle_rule(
        pg_shared_dsns: list[str]) -> None:
    """The one-statement batch (batch.py): every case of tally.core.toggle's rule in one request,
    each answered as the rule says, one outbox row per real change, numbers contiguous."""
    from tally.core.model import ToggleOp
    from tally.store.postgres.build import PostgresConfig, build_postgres

    stores = build_postgres(PostgresConfig(pg_shared_dsns, logical_shards=64))
    await stores.start()
    try:
        likes, sm = stores.likes, stores.cluster.map
        tag = time.time_ns()
        users = [u for u in (f"b{tag}-{i}" for i in range(200)) if sm.db_of(u) == 0][:8]
        item = f"post:b{tag}"
        before = [False, False, True, True, False, True, False, True]  # each user's state
        await likes.write([ToggleOp("like", item, u, True, "eu")
                           for u, on in zip(users, before, strict=True) if on])
        wanted = [True, False, False, True, True, False, True, True]
        ops = [ToggleOp("like", item, u, on, "eu") for u, on in zip(users, wanted, strict=True)]
        head = {s: await likes.outbox_head(s) for s in likes.sources_of(0)}
        results = await likes.write(ops)
        deltas = follows_the_toggle_rule(results, before, wanted)
        moved = [s for s in head if await likes.outbox_head(s) != head[s]]
        assert len(moved) == 1  # one slot numbered the whole batch
        rows = [e for e in await likes.pending(moved[0], head[moved[0]], 100) if e.item == item]
        assert [e.delta for e in rows] == [d for d in deltas if d]
        assert [e.seq for e in rows] == list(range(head[moved[0]] + 1, head[moved[0]] + 1 + len(rows)))
        assert [r.seq for r in results if r.changed] == [e.seq for e in rows]
        assert await likes.has("like", users[0], [item]) == [True]
        for user, on in zip(users, wanted, strict=True):
            assert await likes.has("like", user, [item]) == [on]
    finally:
        await stores.close()


async def test_a_bulk_of_distinct_toggles_across_databases_is_one_statement_each(
        pg_shared_dsns: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A bulk whose toggles touch distinct records, in both databases, runs the one-statement
    batch in each database's transaction (not the replay's four statements), answers by the
    toggle rule with read-your-writes counts, and numbers one outbox slot per database."""
    from tally.core.model import ToggleOp
    from tally.store.postgres import likes as likes_module
    from tally.store.postgres.batch import write_toggles
    from tally.store.postgres.build import PostgresConfig, build_postgres

    stores = build_postgres(PostgresConfig(pg_shared_dsns, logical_shards=64))
    await stores.start()
    try:
        likes, sm = stores.likes, stores.cluster.map
        tag = time.time_ns()
        pool = [f"x{tag}-{i}" for i in range(400)]
        users = ([u for u in pool if sm.db_of(u) == 0][:4] + [u for u in pool if sm.db_of(u) == 1][:4])
        item = f"post:x{tag}"
        before = [False, True, True, False, True, False, True, False]
        await likes.write([ToggleOp("like", item, u, True, "eu")
                           for u, on in zip(users, before, strict=True) if on])
        wanted = [True, False, True, False, False, True, True, True]
        statements: list[int] = []

        async def counted(conn: Any, ops: Any, *args: Any) -> Any:
            statements.append(len(ops))
            return await write_toggles(conn, ops, *args)

        monkeypatch.setattr(likes_module, "write_toggles", counted)
        heads = {s: await likes.outbox_head(s) for db in (0, 1) for s in likes.sources_of(db)}
        results = await likes.write([ToggleOp("like", item, u, on, "eu")
                                     for u, on in zip(users, wanted, strict=True)])
        assert sorted(statements) == [4, 4]  # one statement per database, each its four
        deltas = follows_the_toggle_rule(results, before, wanted)
        moved = [s for s in heads if await likes.outbox_head(s) != heads[s]]
        assert len(moved) == 2  # a slot of each database
        rows = [e for s in moved for e in await likes.pending(s, heads[s], 100) if e.item == item]
        assert sorted(e.delta for e in rows) == sorted(d for d in deltas if d)
        for user, on in zip(users, wanted, strict=True):
            assert await likes.has("like", user, [item]) == [on]
    finally:
        await stores.close()
