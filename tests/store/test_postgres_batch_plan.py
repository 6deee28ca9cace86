"""The plans of the statements that look up toggles and counts by key, as a connection keeps them.

asyncpg prepares each statement once per connection and PostgreSQL soon keeps a generic plan for
it, made with the statistics of that moment. On a new, empty database a join of ``toggles`` or
``counts`` with the request's keys is cheapest as a hash join over a full scan (or a probe of the
partial index of an item's likes, filtered by user), and the connection keeps that plan while the
table grows: every batch, bulk or has-liked would then read the whole table (or every like of the
item). The statements probe each key by a subquery or a lateral subquery, or write through
``ON CONFLICT``, so that the plan made on the new database is the primary key's.
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
import pytest

from tally.store.postgres import cluster, likes, regions, single
from tally.store.postgres.batch import TOGGLES
from tally.store.postgres.schema import migrate

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

# name: (parameter types, statement, arguments of one EXPLAIN EXECUTE)
STATEMENTS = {
    "batch": ("text[], text[], text[], bool[], int[], text[], int[], float8, text", TOGGLES,
              "'{like,like}', '{u1,u2}', '{post:1,post:2}', '{t,f}', '{1,1}', '{eu,eu}', "
              "'{0,1}', 0, 'db0.0'"),
    "lock": ("text[], text[], text[]", likes._LOCK, "'{like}', '{u1}', '{post:1}'"),
    "update": ("text[], text[], text[], bool[], int[], float8, int[]", likes._UPDATE,
               "'{like}', '{u1}', '{post:1}', '{t}', '{1}', 0, '{1}'"),
    "has": ("text, text, text[]", likes._HAS, "'like', 'u1', '{post:1}'"),
    "records": ("text[], text[], text[]", regions._RECORDS, "'{like}', '{u1}', '{post:1}'"),
    "clear": ("text, text, text, float8, int, text, text, int", single.CLEAR,
              "'like', 'u1', 'post:1', 0, 1, 'db0.0', 'eu', -1"),
    "counts": ("text[], text[]", cluster._COUNTS, "'{like,like}', '{post:1,post:2}'"),
}


async def generic_plan(conn: asyncpg.Connection, name: str, types: str, sql: str,
                       args: str) -> str:
    await conn.execute(f"PREPARE {name} ({types}) AS {sql}")
    return "\n".join(row[0] for row in await conn.fetch(f"EXPLAIN EXECUTE {name}({args})"))


@pytest.mark.parametrize("name", sorted(STATEMENTS))
async def test_a_generic_plan_made_on_empty_tables_finds_rows_by_the_primary_key(
        pg_database: Callable[[], str], name: str) -> None:
    conn = await asyncpg.connect(pg_database())
    try:
        await migrate(conn, 0)
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        plan = await generic_plan(conn, name, *STATEMENTS[name])
    finally:
        await conn.close()
    for table in ("toggles", "counts"):
        assert f"Seq Scan on {table}" not in plan, plan
    assert "toggles_on_by_item" not in plan, plan  # every like of the item, filtered by user
    if name not in ("update", "counts"):  # update: ON CONFLICT's arbiter, no scan named
        assert "using toggles_pkey on toggles" in plan, plan
    if name in ("batch", "clear", "counts"):
        assert "Index Scan using counts_pkey on counts" in plan, plan


async def test_a_batch_unlike_changes_only_rows_that_are_on(
        pg_database: Callable[[], str]) -> None:
    """The unlike part writes through ON CONFLICT only the rows its probe locked while on: an
    unlike of a record that is off, or missing, writes nothing (and inserts no row)."""
    conn = await asyncpg.connect(pg_database())
    try:
        await migrate(conn, 0)
        await conn.execute("INSERT INTO toggles VALUES ('like', 'u1', 'p1', true, 1, 0, 1), "
                           "('like', 'u2', 'p1', false, 2, 0, 1)")
        rows = await conn.fetch(TOGGLES, ["like"] * 3, ["u1", "u2", "u3"], ["p1"] * 3,
                                [False] * 3, [1] * 3, ["eu"] * 3, [0, 1, 2], 5.0, "db0.0")
        table = {r[0]: tuple(r[1:]) for r in await conn.fetch(
            "SELECT user_id, state, version, updated_at FROM toggles ORDER BY user_id")}
        outbox = await conn.fetch("SELECT user_id, delta FROM outbox")
    finally:
        await conn.close()
    assert {r[0]: r[1] for r in rows} == {0: 1, 1: None, 2: None}
    assert table == {"u1": (False, 2, 5.0), "u2": (False, 2, 0.0)}
    assert [tuple(r) for r in outbox] == [("u1", -1)]


async def test_the_probing_reads_answer_as_the_joins_did(pg_database: Callable[[], str]) -> None:
    """Has-liked, the regions' records and the bulk path's lock read only the keys asked for."""
    dsn = pg_database()
    conn, other = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        await migrate(conn, 0)
        await conn.execute("INSERT INTO toggles VALUES ('like', 'u1', 'p1', true, 1, 3, 1), "
                           "('like', 'u1', 'p2', false, 2, 4, 1), ('like', 'u2', 'p1', true, 1, 5, 2)")
        has = await conn.fetch(likes._HAS, "like", "u1", ["p2", "p1", "p3"])
        records = await conn.fetch(regions._RECORDS, ["like", "like", "like"], ["u1", "u2", "u3"],
                                   ["p2", "p1", "p1"])
        async with conn.transaction():
            locked = await conn.fetch(likes._LOCK, ["like", "like", "like"], ["u2", "u1", "u9"],
                                      ["p1", "p2", "p1"])
            free = [r[0] for r in await other.fetch(
                "SELECT user_id || '/' || item FROM toggles FOR UPDATE SKIP LOCKED")]
    finally:
        await conn.close()
        await other.close()
    assert [r[0] for r in has] == ["p1"]
    assert sorted(tuple(r) for r in records) == [("like", "u1", "p2", False, 4.0),
                                                 ("like", "u2", "p1", True, 5.0)]
    assert [tuple(r) for r in locked] == [("like", "u1", "p2", False), ("like", "u2", "p1", True)]
    assert free == ["u1/p1"]  # the two rows read are locked, the third is not
