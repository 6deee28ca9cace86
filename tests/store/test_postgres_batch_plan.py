"""The group-commit batch statement's plan as a connection keeps it: made on a new, empty database.

asyncpg prepares the statement once per connection and PostgreSQL soon keeps a generic plan for
it, made with the statistics of that moment. A plan that scans ``counts`` whole is the cheapest
for an empty table and stays the connection's while the table grows: every batch would then read
every count row. The statement reads the counts by a per-op subquery, which has only the index.
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
import pytest

from tally.store.postgres.batch import TOGGLES
from tally.store.postgres.schema import migrate

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

_TYPES = "text[], text[], text[], bool[], int[], text[], int[], float8, text"


async def test_a_generic_plan_made_on_empty_tables_reads_counts_by_the_index(
        pg_database: Callable[[], str]) -> None:
    conn = await asyncpg.connect(pg_database())
    try:
        await migrate(conn, 0)
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        await conn.execute(f"PREPARE batch ({_TYPES}) AS {TOGGLES}")
        rows = await conn.fetch("EXPLAIN EXECUTE batch('{like}', '{u1}', '{post:1}', '{t}', '{1}', "
                                "'{eu}', '{0}', 0, 'db0.0')")
    finally:
        await conn.close()
    plan = "\n".join(row[0] for row in rows)
    assert "Seq Scan on counts" not in plan, plan
    assert "Index Scan using counts_pkey on counts" in plan, plan
