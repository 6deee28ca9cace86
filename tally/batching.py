"""Client-side batching: concurrent like/unlike/incr calls travel together as /v1/bulk requests.

A service that calls ``like()`` from many coroutines pays one HTTP round trip per call; the server
then spends most of its time on HTTP rather than on likes. ``Batcher`` gathers the calls made
within a short window (2 ms by default), up to ``max_ops``, into one bulk request and hands each
caller its own result, so one connection carries tens of thousands of likes per second. Each call
still resolves only after the server has committed it (the bulk request is all or nothing).

A bulk request is rejected whole when one of its operations is invalid; the batcher then fails
only that caller (the server names the operation in the error's field, ``ops[i]...``) and sends
the others again, so one bad call never fails its neighbours.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any, Protocol

from tally.wire import Id, IncrResult, TallyAPIError, ToggleResult, toggle_body

_Pending = tuple[dict[str, Any], "asyncio.Future[dict[str, Any]]"]
# Defaults. A bulk request is answered when its transaction commits, so its size sets a floor
# under every caller's latency: larger requests raise it, smaller ones pay for more requests.
# These two sat between the two in the client-batching runs of docs/performance.md.
BATCHER_MAX_OPS = 250
BATCHER_IN_FLIGHT = 8
_OP_FIELD = re.compile(r"ops\[(\d+)\]")


class BulkClient(Protocol):
    """What the batcher sends through (``AsyncTally``)."""

    async def bulk(self, ops: Sequence[dict[str, Any]]) -> list[dict[str, Any]]: ...


def _failed_index(exc: TallyAPIError, size: int) -> int | None:
    """Which operation the server rejected, when it says so and others remain to be sent."""
    m = _OP_FIELD.match(exc.field or "")
    if exc.status != 422 or m is None or size < 2:
        return None
    index = int(m.group(1))
    return index if index < size else None


def _fail(batch: list[_Pending], exc: BaseException) -> None:
    for _op, fut in batch:
        if not fut.done():
            fut.set_exception(exc)


class Batcher:
    def __init__(self, client: BulkClient, max_ops: int = BATCHER_MAX_OPS, window_s: float = 0.002,
                 max_in_flight: int = BATCHER_IN_FLIGHT) -> None:
        """``max_ops`` must not exceed the server's ``max_bulk_ops`` (1000 by default)."""
        self.client = client
        self.max_ops = max_ops
        self.window_s = window_s
        self._slots = asyncio.Semaphore(max_in_flight)
        self._pending: list[_Pending] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.requests = 0  # bulk requests sent, for callers who watch the batching work

    async def __aenter__(self) -> Batcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def like(self, user: Id, item_type: str, item_id: Id, region: str | None = None
                   ) -> ToggleResult:
        return await self.set(user, item_type, item_id, "like", True, region)

    async def unlike(self, user: Id, item_type: str, item_id: Id, region: str | None = None
                     ) -> ToggleResult:
        return await self.set(user, item_type, item_id, "like", False, region)

    async def set(self, user: Id, item_type: str, item_id: Id, counter: str = "like",
                  on: bool = True, region: str | None = None) -> ToggleResult:
        op = {"op": "set" if on else "clear", "counter": counter,
              **toggle_body(user, item_type, item_id, region)}
        res = await self._submit(op)
        return ToggleResult(state=on, changed=res["changed"], count=res["count"])

    async def incr(self, counter: str, item_type: str, item_id: Id, n: int = 1,
                   idempotency_key: str | None = None, user: Id | None = None) -> IncrResult:
        op: dict[str, Any] = {"op": "incr", "counter": counter, "item_type": item_type,
                              "item_id": item_id, "n": n}
        if idempotency_key is not None:
            op["idempotency_key"] = idempotency_key
        if user is not None:
            op["user_id"] = user
        res = await self._submit(op)
        return IncrResult(applied=res["changed"], count=res["count"])

    def _submit(self, op: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._pending.append((op, fut))
        if len(self._pending) >= self.max_ops:
            self.flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.window_s, self.flush)
        return fut

    def flush(self) -> None:
        """Send what is gathered now, without waiting for the window to close."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Pending]) -> None:
        async with self._slots:
            while batch:
                self.requests += 1
                try:
                    results = await self.client.bulk([op for op, _fut in batch])
                except TallyAPIError as exc:
                    bad = _failed_index(exc, len(batch))
                    if bad is None:
                        _fail(batch, exc)
                        return
                    _fail([batch.pop(bad)], exc)
                    continue
                except Exception as exc:  # transport errors: the caller decides to retry
                    _fail(batch, exc)
                    return
                for (_op, fut), res in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result(res)
                return

    async def close(self) -> None:
        """Send what is pending and wait until every request has been answered."""
        self.flush()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
