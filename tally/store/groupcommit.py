"""Group commit: concurrent single operations to one engine travel in one round trip.

Shared by the backends: the PostgreSQL like store (likes in one transaction, below) and the
shared rate-limit buckets (``tally.store.rediscache.buckets``: takes in one script call).

A like is durable when its commit's WAL is flushed, and PostgreSQL pays that flush, a
transaction and its statements per commit, whatever the commit holds. One request per like, as
users send them, would pay all of it per like (as the naive one-transaction-per-like design does).
``GroupCommit`` keeps at most ``in_flight`` transactions per database running from this process;
likes that arrive meanwhile queue, and the next transaction takes every one of them (up to
``max_batch``). At low load a like goes alone and at once (no timer, no added wait); under load
the queue fills while the previous commit flushes, so the cost per like falls as the load grows.

Every caller is answered only after the transaction holding its like committed, with its own
result (or its own error: ``run`` may answer an exception for one op, e.g. a like whose shard is
being moved, so that it does not fail its neighbours); a failed transaction fails every like in
it (each caller sees the error, as it would alone), and a retried one is retried whole:
toggles set a state, so running one again changes nothing more. The transaction replays the
likes in arrival order, so two toggles of one (user, item) in one batch still follow
``tally.core.toggle``'s rule one after the other.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Op = TypeVar("Op")
Result = TypeVar("Result")


class GroupCommit(Generic[Op, Result]):
    """Per-database queues of single operations, written ``max_batch`` at a time by ``run``."""

    def __init__(self, run: Callable[[int, Sequence[Op]],
                                     Awaitable[Sequence[Result | BaseException]]],
                 in_flight: int = 2, max_batch: int = 256) -> None:
        if in_flight < 1 or max_batch < 1:
            raise ValueError("in_flight and max_batch must be at least 1")
        self.run = run
        self.in_flight = in_flight
        self.max_batch = max_batch
        self._queues: dict[int, list[tuple[Op, asyncio.Future[Result]]]] = {}
        self._running: dict[int, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # transactions run (for the metrics: likes per transaction)
        self.ops = 0

    async def submit(self, db: int, op: Op) -> Result:
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(db, []).append((op, fut))
        if self._running.get(db, 0) < self.in_flight:
            self._running[db] = self._running.get(db, 0) + 1
            task = asyncio.create_task(self._drain(db), name=f"tally-group-commit-{db}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # The caller may give up (a client that went away); its like still commits with the batch.
        return await asyncio.shield(fut)

    async def _drain(self, db: int) -> None:
        """Write this database's queue, a batch at a time, until it is empty."""
        try:
            queue = self._queues[db]
            while queue:
                batch = queue[:self.max_batch]
                del queue[:self.max_batch]
                await self._write(db, batch)
        finally:
            self._running[db] -= 1

    async def _write(self, db: int, batch: list[tuple[Op, asyncio.Future[Result]]]) -> None:
        self.batches += 1
        self.ops += len(batch)
        try:
            results = await self.run(db, [op for op, _ in batch])
        except asyncio.CancelledError:
            for _, fut in batch:
                fut.cancel()
            raise
        except Exception as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, fut), result in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    async def close(self) -> None:
        """Wait for the transactions under way (their callers are answered)."""
        while self._tasks:
            with contextlib.suppress(Exception):
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
