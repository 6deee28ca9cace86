"""The aggregator: reads the change log after its watermark, coalesces, applies exactly once.

Each round reads up to ``max_events`` events, sums them per (counter, item) and rollup bucket, and
hands the batch to the count store, which adds the deltas and moves the watermark in one
transaction, on the condition that the watermark is still where this aggregator read it. Where
the log and the counts are one database (``in_place``), the store runs the same round itself. A crash
before the commit loses nothing (the events are still after the watermark); a crash after it
double-applies nothing (the watermark has moved past them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tally.core.coalesce import coalesce
from tally.core.errors import Unavailable
from tally.core.model import CountKey
from tally.store.ports import ChangeLog, CountStore, InPlaceAggregation

log = logging.getLogger("tally.aggregator")

# Rounds of up to this many events are summed on the event loop; larger ones (the backlog after a
# burst) in a thread: summing a large backlog holds the loop long enough for every request to
# wait behind it, while a small round costs less inline than the hand-off to a thread.
INLINE_EVENTS = 2000


@dataclass
class AggregatorStats:
    watermark: int = 0
    head: int = 0
    batches: int = 0
    events: int = 0
    keys_written: int = 0
    conflicts: int = 0
    lag_seconds: float = 0.0
    last_error: str | None = None


class Aggregator:
    def __init__(self, changelog: ChangeLog, counts: CountStore, consumer: str = "aggregator",
                 window_s: float = 0.1, max_events: int = 20_000,
                 rollups: Sequence[str] = ("day", "region"),
                 on_applied: Callable[[dict[CountKey, int]], None] | None = None,
                 in_place: InPlaceAggregation | None = None) -> None:
        self.log = changelog
        self.counts = counts
        self.in_place = in_place
        self.consumer = consumer
        self.window_s = window_s
        self.max_events = max_events
        self.rollups = tuple(rollups)
        self.on_applied = on_applied or (lambda counts: None)
        self.stats = AggregatorStats()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def notify(self) -> None:
        """A write happened: wake up (the window still gathers it with its neighbours)."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="tally-aggregator")

    async def stop(self) -> None:
        if self._task is not None:
            # A round holds the lock from its read to its trim: cancelled in between, it would
            # leave applied events in the log (and a batch of cache writes undone). Let the round
            # in progress finish, then cancel the task where it waits.
            async with self._lock:
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.drain()
        except Unavailable as exc:  # the next start goes on from the watermark
            log.warning("aggregator stopped without draining", extra={"error": str(exc)})

    async def step(self) -> int:
        """One round: apply up to max_events events. Returns how many were applied."""
        async with self._lock:
            if self.in_place is not None:
                return await self._step_in_place(self.in_place)
            marks = await self.counts.watermarks(self.consumer)
            wm = marks.get(self.log.source, 0)
            events = await self.log.read(wm, self.max_events)
            self.stats.watermark = wm
            if not events:
                self.stats.lag_seconds = 0.0
                return 0
            if len(events) <= INLINE_EVENTS:
                batch = coalesce(events, self.rollups, marks)
            else:  # after a burst: off the event loop, which keeps answering meanwhile
                batch = await asyncio.to_thread(coalesce, events, self.rollups, marks)
            new = await self.counts.apply_batch(batch, self.consumer, marks)
            if new is None:
                self.stats.conflicts += 1
                log.warning("watermark moved under us; re-reading",
                            extra={"consumer": self.consumer})
                return 0
            self.stats.watermark = batch.positions.get(self.log.source, wm)
            self.stats.batches += 1
            self.stats.events += batch.events
            self.stats.keys_written += len(new)
            self.on_applied(new)
            return batch.events

    async def _step_in_place(self, store: InPlaceAggregation) -> int:
        """The same round inside the store: no event leaves the database."""
        applied = await store.aggregate(self.consumer, self.max_events, self.rollups)
        self.stats.watermark = applied.position
        if not applied.events:
            self.stats.lag_seconds = 0.0
            return 0
        self.stats.batches += 1
        self.stats.events += applied.events
        self.stats.keys_written += len(applied.counts)
        self.on_applied(applied.counts)
        return applied.events

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Apply everything logged so far (tests, reconcile and shutdown use this)."""
        deadline = time.monotonic() + timeout_s
        while await self.step():
            if time.monotonic() > deadline:
                raise TimeoutError("change log did not drain in time")

    async def refresh_lag(self) -> None:
        if self.in_place is not None:  # its logs may be several (shards): the store sums them
            self.stats.head, _applied, oldest = await self.in_place.lag(self.consumer)
        else:
            self.stats.head = await self.log.head()
            oldest = await self._oldest_unapplied()
        self.stats.lag_seconds = 0.0 if oldest is None else max(time.time() - oldest, 0.0)

    async def _oldest_unapplied(self) -> float | None:
        events = await self.log.read(self.stats.watermark, 1)
        return events[0].ts if events else None

    async def _run(self) -> None:
        idle_poll_s = max(self.window_s * 5, 0.5)
        while True:
            try:
                applied = await self.step()
                if applied < self.max_events:
                    await self._wait(idle_poll_s if applied == 0 else self.window_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep going: the next round retries from the watermark
                self.stats.last_error = repr(exc)
                log.exception("aggregation round failed", extra={"consumer": self.consumer})
                await asyncio.sleep(min(self.window_s * 10, 1.0))

    async def _wait(self, timeout_s: float) -> None:
        # asyncio.timeout, not wait_for: on Python 3.11, wait_for swallows a cancellation that
        # arrives as the wake-up fires, and stop() then waits forever for this task.
        self._wake.clear()
        try:
            async with asyncio.timeout(timeout_s):
                await self._wake.wait()
        except TimeoutError:
            return
        await asyncio.sleep(self.window_s)  # gather the window's neighbours
