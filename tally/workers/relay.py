"""The relay: copies each source shard's outbox to the event log, at least once, then trims it.

Per source the relay is strictly sequential: read the oldest untrimmed rows (in sequence order),
publish them (``PartitionedLog.publish`` returns only when every message is stored), trim them, read
the next. A failed publish is retried with the same rows from the first unacknowledged one, so
within a partition no event of a source is ever stored for the first time after a later event
of the same source (the rule the consumers' sequence watermarks rely on; see
``tally.store.jetstream.eventlog``).
A row is trimmed only after its publish is acknowledged, so a crash at any point re-publishes,
never loses; duplicates are dropped by the consumers' watermarks, whatever the outage length.

Several relays may run: sources are shared by ``LeaseSet``, so each
source has one relay at a time. A relay that lost its lease without noticing can only publish
copies of rows the new owner also publishes, in the same order: harmless duplicates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from tally.store.ports import Leases, Outbox, PartitionedLog
from tally.workers.leases import LeaseSet, cancelled, stop_task

log = logging.getLogger("tally.relay")


@dataclass
class SourceStats:
    published: int = 0  # events
    batches: int = 0
    failures: int = 0
    lag_seconds: float = 0.0  # age of the oldest unpublished row at the last read
    backlog: int = 0  # rows read in the last round (a full batch means more are waiting)
    last_error: str | None = None


class SourceRelay:
    """Publishes one source shard while this process holds its lease."""

    def __init__(self, source: str, outbox: Outbox, events: PartitionedLog, batch: int = 1000,
                 idle_min_s: float = 0.005, idle_max_s: float = 0.1) -> None:
        """``idle_min_s``: the pause after a round that emptied the outbox (the relay window).
        A round costs a read, a publish and a trim whatever it carries: at a few rows per round
        that fixed cost is most of a like's relay, NATS and aggregator CPU, so the window lets
        the rows of a busy outbox gather first; an idle outbox is polled ever less often."""
        self.source = source
        self.outbox = outbox
        self.events = events
        self.batch = batch
        self.idle_min_s = idle_min_s
        self.idle_max_s = idle_max_s
        self.stats = SourceStats()
        self._published_through = 0  # rows at or below are acknowledged (and trimmed, or being)

    async def run(self) -> None:
        backoff, idle = 0.05, self.idle_min_s
        while True:
            try:
                moved = await self.step()
                backoff = 0.05
                # Polling: back off while the outbox stays empty (CPU and queries on an idle
                # shard), and poll again at once after a full batch.
                idle = self.idle_min_s if moved else min(idle * 2, self.idle_max_s)
                if moved < self.batch:
                    await asyncio.sleep(idle)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # retry the same rows: nothing was trimmed
                if cancelled():
                    raise asyncio.CancelledError from exc
                self.stats.failures += 1
                self.stats.last_error = repr(exc)
                log.warning("relay round failed; retrying from the first unpublished row",
                            extra={"source": self.source, "error": repr(exc),
                                   "retry_in_s": backoff})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def step(self) -> int:
        """Publish and trim the oldest untrimmed rows; returns how many."""
        rows = await self.outbox.pending(self.source, self._published_through, self.batch)
        self.stats.backlog = len(rows)
        if not rows:
            self.stats.lag_seconds = 0.0
            return 0
        self.stats.lag_seconds = max(time.time() - min(r.ts for r in rows), 0.0)
        await self.events.publish(self.source, rows)
        self._published_through = rows[-1].seq
        await self.outbox.trim(self.source, rows[-1].seq)
        self.stats.published += len(rows)
        self.stats.batches += 1
        return len(rows)


class Relay:
    """The relay role: leases source shards and runs a ``SourceRelay`` for each one held."""

    def __init__(self, leases: Leases, outbox: Outbox, events: PartitionedLog, batch: int = 1000,
                 lease_period_s: float = 0.5, window_s: float = 0.005) -> None:
        self.outbox = outbox
        self.window_s = window_s
        self.events = events
        self.batch = batch
        self.sources: dict[str, SourceRelay] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.leases = LeaseSet(leases, "relay", sorted(outbox.sources()), self._gain, self._lose,
                               lease_period_s)

    def start(self) -> None:
        self.leases.start()

    async def stop(self) -> None:
        await self.leases.stop()

    async def _gain(self, source: str) -> None:
        relay = SourceRelay(source, self.outbox, self.events, self.batch,
                            idle_min_s=self.window_s, idle_max_s=max(0.1, self.window_s))
        self.sources[source] = relay
        self._tasks[source] = asyncio.create_task(relay.run(), name=f"tally-relay-{source}")

    async def _lose(self, source: str) -> None:
        task = self._tasks.pop(source, None)
        self.sources.pop(source, None)
        if task is not None:
            await stop_task(task, f"relay {source}")

    def lag(self) -> tuple[int, float]:
        """(rows read but not yet published in the last rounds, oldest age) over held sources."""
        rows = sum(s.stats.backlog for s in self.sources.values())
        age = max((s.stats.lag_seconds for s in self.sources.values()), default=0.0)
        return rows, age
