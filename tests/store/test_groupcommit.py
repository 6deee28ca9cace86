"""Group commit's queueing (tally/store/groupcommit.py), with a recording writer: the
PostgreSQL behaviour is in test_postgres.py (test_concurrent_single_likes_share_transactions)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from tally.store.groupcommit import GroupCommit

pytestmark = pytest.mark.anyio


class Writer:
    """Writes batches after a pause (a commit's flush), records them, can refuse ops."""

    def __init__(self, refuse: frozenset[int] = frozenset(), fail: bool = False) -> None:
        self.batches: list[tuple[int, list[int]]] = []
        self.refuse = refuse
        self.fail = fail

    async def __call__(self, db: int, ops: Sequence[int]) -> list[int | BaseException]:
        self.batches.append((db, list(ops)))
        await asyncio.sleep(0.01)
        if self.fail:
            raise ConnectionError("database went away")
        return [ValueError(op) if op in self.refuse else op * 10 for op in ops]


async def test_a_lone_op_goes_at_once_and_a_burst_shares_batches() -> None:
    writer = Writer()
    group: GroupCommit[int, int] = GroupCommit(writer, in_flight=2, max_batch=16)
    assert await group.submit(0, 1) == 10
    assert writer.batches == [(0, [1])]
    results = await asyncio.gather(*(group.submit(n % 2, n) for n in range(100)))
    assert results == [n * 10 for n in range(100)]
    sizes = [len(ops) for _, ops in writer.batches[1:]]
    assert sum(sizes) == 100 and max(sizes) <= 16 and len(sizes) < 100
    for db, ops in writer.batches[1:]:  # each batch holds one database's ops, in arrival order
        assert {op % 2 for op in ops} == {db} and ops == sorted(ops)
    assert (group.batches, group.ops) == (len(writer.batches), 101)


async def test_an_op_refused_alone_fails_alone() -> None:
    group: GroupCommit[int, int] = GroupCommit(Writer(refuse=frozenset({3})))
    results = await asyncio.gather(*(group.submit(0, n) for n in range(6)),
                                   return_exceptions=True)
    assert isinstance(results[3], ValueError)
    assert [r for i, r in enumerate(results) if i != 3] == [0, 10, 20, 40, 50]


async def test_a_failed_batch_fails_each_of_its_callers() -> None:
    group: GroupCommit[int, int] = GroupCommit(Writer(fail=True))
    results = await asyncio.gather(*(group.submit(0, n) for n in range(5)),
                                   return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)


async def test_a_caller_that_gives_up_does_not_stop_the_batch() -> None:
    writer = Writer()
    group: GroupCommit[int, int] = GroupCommit(writer)
    waiting = asyncio.create_task(group.submit(0, 7))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await group.close()
    assert writer.batches == [(0, [7])]
