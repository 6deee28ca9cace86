"""PgCluster's retry across a failover: retry-safe work waits for a primary, other work fails fast.

No engine is needed: the attempts stand in for a database that has no primary for a while.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from tally.core.errors import Unavailable
from tally.core.model import IncrOp, ToggleOp
from tally.store.postgres.cluster import PgCluster, Unreachable
from tally.store.postgres.likes import retry_safe
from tally.store.shards import ShardMap

pytestmark = pytest.mark.anyio


def flaky(failures: int) -> tuple[list[int], Callable[[], Awaitable[str]]]:
    calls: list[int] = []

    async def attempt() -> str:
        calls.append(1)
        if len(calls) <= failures:
            raise Unreachable("postgres database 0 is unreachable: no primary yet")
        return "committed"

    return calls, attempt


async def test_retry_safe_work_waits_for_the_new_primary() -> None:
    cluster = PgCluster(["postgresql://x@127.0.0.1:1/db"], ShardMap.build(64, 1), failover_s=10)
    calls, attempt = flaky(3)
    assert await cluster.retrying("write", attempt) == "committed"
    assert len(calls) == 4


async def test_work_unsafe_to_repeat_fails_at_once() -> None:
    cluster = PgCluster(["postgresql://x@127.0.0.1:1/db"], ShardMap.build(64, 1), failover_s=10)
    calls, attempt = flaky(3)
    with pytest.raises(Unavailable):
        await cluster.retrying("write", attempt, idempotent=False)
    assert len(calls) == 1


async def test_the_wait_is_bounded_by_failover_s() -> None:
    cluster = PgCluster(["postgresql://x@127.0.0.1:1/db"], ShardMap.build(64, 1), failover_s=0.3)
    calls, attempt = flaky(1_000)
    with pytest.raises(Unavailable, match="unreachable"):
        await cluster.retrying("write", attempt)
    assert 1 < len(calls) < 1_000


def test_only_toggles_and_keyed_increments_are_retry_safe() -> None:
    like = ToggleOp(counter="like", item="post:1", user="u1", on=True, region="eu")
    keyed = IncrOp(counter="view", item="post:1", n=1, region="eu", idempotency_key="k1")
    bare = IncrOp(counter="view", item="post:1", n=1, region="eu")
    assert retry_safe([like, keyed]) and not retry_safe([like, bare])
