"""The relay: copies each source shard's outbox to the event log, at least once, then trims it.

Per source the relay is strictly sequential: read the oldest untrimmed rows (in sequence order),
publish them (``PartitionedLog.publish_runs`` returns only when every message is stored), trim
them, read the next. The sources of one database go through these steps together, in one round
(``GroupRelay``). A failed publish is retried with the same rows from the first unacknowledged one, so
within a partition no event of a source is ever stored for the first time after a later event
of the same source (the rule the consumers' sequence watermarks rely on; see
``tally.store.jetstream.eventlog``).
A row is trimmed only after its publish is acknowledged, so a crash at any point re-publishes,
never loses; duplicates are dropped by the consumers' watermarks, whatever the outage length.
The running relay trims a round's rows with the next round's read (one round trip, not two), so
a relay that stops or loses a source leaves at most its last round for the next owner to publish
again.

Several relays may run: sources are shared by ``LeaseSet``, so each
source has one relay at a time. A relay that lost its lease without noticing can only publish
copies of rows the new owner also publishes, in the same order: harmless duplicates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
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


class SourceCursor:
    """One source's place in its group: rows at or below ``published_through`` are acknowledged,
    and those at or below ``trimmed_through`` deleted."""

    def __init__(self) -> None:
        self.stats = SourceStats()
        self.published_through = 0
        self.trimmed_through = 0


class GroupRelay:
    """Publishes the held sources of one group (one database's outbox slots) round by round.

    A round reads every held source's oldest untrimmed rows in one query, publishes them together
    (one message per partition carries every source's run, ``PartitionedLog.publish_runs``) and
    trims them in one statement: the fixed cost of a round (a read, a fsynced message per
    partition touched, a trim) is paid once per group, not once per source. A failed round is
    retried whole; each source's rows still go out in order, the next round only after this one
    is acknowledged, so the ordering rule of the module docstring holds per source."""

    def __init__(self, sources: Iterable[str], outbox: Outbox, events: PartitionedLog,
                 batch: int = 1000, idle_min_s: float = 0.005, idle_max_s: float = 0.1) -> None:
        """``idle_min_s``: the pause after a round that emptied the outboxes (the relay window).
        A round costs a read, a publish and a trim whatever it carries: at a few rows per round
        that fixed cost is most of a like's relay, NATS and aggregator CPU, so the window lets
        the rows of a busy outbox gather first; idle outboxes are polled ever less often."""
        self.outbox = outbox
        self.events = events
        self.batch = batch
        self.idle_min_s = idle_min_s
        self.idle_max_s = idle_max_s
        self.sources = {source: SourceCursor() for source in sources}

    async def run(self) -> None:
        backoff, idle = 0.05, self.idle_min_s
        while True:
            try:
                moved, full = await self.round()
                backoff = 0.05
                # Polling: back off while the outboxes stay empty (CPU and queries on an idle
                # database), and poll again at once after a full batch.
                idle = self.idle_min_s if moved else min(idle * 2, self.idle_max_s)
                if not full:
                    await asyncio.sleep(idle)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # retry the same rows: nothing was trimmed
                if cancelled():
                    raise asyncio.CancelledError from exc
                for cursor in self.sources.values():
                    cursor.stats.failures += 1
                    cursor.stats.last_error = repr(exc)
                log.warning("relay round failed; retrying from the first unpublished row",
                            extra={"sources": sorted(self.sources), "error": repr(exc),
                                   "retry_in_s": backoff})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def step(self) -> int:
        """One round and its trim; returns how many rows were published and trimmed."""
        moved = (await self.round())[0]
        through = {source: c.published_through for source, c in self.sources.items()
                   if c.published_through > c.trimmed_through}
        if through:
            await self.outbox.trim_many(through)
            for source, seq in through.items():
                self.sources[source].trimmed_through = seq
        return moved

    async def round(self) -> tuple[int, bool]:
        """Trim what the last round published, then publish the held sources' next rows:
        (rows, a source was full)."""
        cursors = dict(self.sources)  # a source given up during the round is finished with it
        if not cursors:
            return 0, False
        trim = any(c.published_through > c.trimmed_through for c in cursors.values())
        runs = await self.outbox.pending_many(
            {source: c.published_through for source, c in cursors.items()}, self.batch, trim)
        if trim:
            for cursor in cursors.values():
                cursor.trimmed_through = cursor.published_through
        now = time.time()
        for source, cursor in cursors.items():
            rows = runs.get(source, [])
            cursor.stats.backlog = len(rows)
            cursor.stats.lag_seconds = max(now - rows[0].ts, 0.0) if rows else 0.0
        if not runs:
            return 0, False
        await self.events.publish_runs(runs)
        for source, rows in runs.items():
            cursors[source].published_through = rows[-1].seq
            cursors[source].stats.published += len(rows)
            cursors[source].stats.batches += 1
        return (sum(len(rows) for rows in runs.values()),
                any(len(rows) >= self.batch for rows in runs.values()))


class Relay:
    """The relay role: leases source shards and runs a ``GroupRelay`` for each group of which
    it holds at least one source."""

    def __init__(self, leases: Leases, outbox: Outbox, events: PartitionedLog, batch: int = 1000,
                 lease_period_s: float = 0.5, window_s: float = 0.005) -> None:
        self.outbox = outbox
        self.window_s = window_s
        self.events = events
        self.batch = batch
        self.groups: dict[int, GroupRelay] = {}
        self._group_of = {source: n for n, group in enumerate(outbox.source_groups())
                          for source in group}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self.leases = LeaseSet(leases, "relay", sorted(outbox.sources()), self._gain, self._lose,
                               lease_period_s)

    @property
    def sources(self) -> dict[str, SourceCursor]:
        """The sources held, each with its stats."""
        return {s: c for group in self.groups.values() for s, c in group.sources.items()}

    def start(self) -> None:
        self.leases.start()

    async def stop(self) -> None:
        await self.leases.stop()

    async def _gain(self, source: str) -> None:
        n = self._group_of[source]
        group = self.groups.get(n)
        if group is None:
            group = self.groups[n] = GroupRelay(
                (), self.outbox, self.events, self.batch, idle_min_s=self.window_s,
                idle_max_s=max(0.1, self.window_s))
            self._tasks[n] = asyncio.create_task(group.run(), name=f"tally-relay-group-{n}")
        group.sources[source] = SourceCursor()

    async def _lose(self, source: str) -> None:
        n = self._group_of[source]
        group = self.groups.get(n)
        if group is None:
            return
        group.sources.pop(source, None)
        if not group.sources:
            del self.groups[n]
            task = self._tasks.pop(n, None)
            if task is not None:
                await stop_task(task, f"relay group {n}")

    def lag(self) -> tuple[int, float]:
        """(rows read but not yet published in the last rounds, oldest age) over held sources."""
        sources = self.sources.values()
        rows = sum(s.stats.backlog for s in sources)
        age = max((s.stats.lag_seconds for s in sources), default=0.0)
        return rows, age
