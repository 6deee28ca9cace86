"""The storage roles the service needs, as Protocols. Each backend module implements them.

The service core and the workers depend on these only, never on a driver: the embedded SQLite
adapter implements all of them in one file; the scale-out backends (PostgreSQL shards, a JetStream
log, Redis) each take one role.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tally.core.coalesce import Batch
from tally.core.model import CountKey, Event, Op, OpResult


class Lifecycle(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...


class LikeStore(Lifecycle, Protocol):
    """Toggle records (the source of truth) and the change log written in the same transaction."""

    async def write(self, ops: Sequence[Op]) -> list[OpResult]:
        """Apply all ops atomically: all are written, or none and an error is raised.

        A toggle op that repeats the current state changes nothing and appends no event.
        (A store sharded over databases is atomic per database; across them only a failure
        during the commits can split a request, which then fails and is safe to retry: see
        ``tally.store.postgres.likes``.)
        """

    async def has(self, counter: str, user: str, items: Sequence[str]) -> list[bool]:
        """Whether the user's toggle is on, for each item, in order."""


class ChangeLog(Lifecycle, Protocol):
    """One ordered log of change events, read by aggregators after their watermark."""

    source: str  # names this log in the consumers' watermarks

    async def read(self, after_seq: int, limit: int) -> list[Event]: ...

    async def head(self) -> int:
        """The newest sequence number written (0 when empty)."""


class Outbox(Lifecycle, Protocol):
    """The transactional outboxes of a sharded LikeStore, which the relay publishes and trims.

    Each source numbers its rows in commit order, so reading ``seq > position`` misses nothing.
    Publishing is at-least-once; consumers skip redeliveries by their watermark per source.
    """

    def sources(self) -> list[str]:
        """Every source (outbox) of the store; ``Event.source`` of its rows."""

    async def pending(self, source: str, after_seq: int, limit: int) -> list[Event]:
        """Rows of one source not yet trimmed, after ``after_seq``, oldest first."""

    async def trim(self, source: str, through_seq: int) -> int:
        """Delete the rows of ``source`` up to ``through_seq`` (published); returns how many."""

    async def outbox_head(self, source: str) -> int:
        """The newest sequence number the source ever handed out (0 when none)."""


class CountStore(Lifecycle, Protocol):
    """Derived counts, applied exactly once together with the consumer's watermark."""

    async def get(self, keys: Sequence[CountKey]) -> dict[CountKey, int]:
        """Counts for the keys that have one; one round trip for the whole batch."""

    async def watermarks(self, consumer: str) -> dict[str, int]:
        """The consumer's applied position in each source log (absent: 0)."""

    async def apply_batch(self, batch: Batch, consumer: str,
                          expect: Mapping[str, int]) -> dict[CountKey, int] | None:
        """Add the deltas and move the consumer's watermarks to ``batch.positions``, atomically.

        Only if each source's stored watermark still equals ``expect`` (absent: 0); else nothing
        is written and None is returned (another consumer applied first). Returns the new
        absolute counts, so caches can be set, not incremented. (Across databases, the decision
        is one transaction and the other databases follow idempotently: ``postgres_counts``.)
        """

    async def rollups(self, counter: str, item_type: str, dimension: str) -> dict[str, int]: ...


@dataclass
class Applied:
    """What one in-place aggregation round did."""

    events: int
    position: int  # the consumer's watermark after the round
    counts: dict[CountKey, int]  # new absolute counts of the keys written
    oldest_ts: float | None  # of the events applied


class InPlaceAggregation(Protocol):
    """A store whose change log and counts one connection can reach (SQLite, its two files
    attached) can aggregate without shipping each event out and back: it reads after the
    consumer's watermark, sums, adds and moves the watermark in one transaction, with the
    semantics of ``tally.core.coalesce``."""

    async def aggregate(self, consumer: str, limit: int, rollups: Collection[str]) -> Applied: ...

    async def lag(self, consumer: str) -> tuple[int, int, float | None]:
        """(events logged, events ``consumer`` applied, oldest unapplied event's time): the
        store may hold several logs (one per shard of the like records); these sum them."""


@dataclass
class Drift:
    counter: str
    item: str
    stored: int  # count table plus deltas still in the log
    actual: int  # recount of the toggle records


@dataclass
class ReconcileChunk:
    checked: int
    drifts: list[Drift] = field(default_factory=list)
    next_after: tuple[str, str] | None = None  # (counter, item) to resume after; None when done


class Recounter(Protocol):
    """Recount toggle counters from the toggle records and repair drifted counts."""

    async def reconcile_chunk(self, counters: Sequence[str], items: Sequence[str] | None,
                              after: tuple[str, str] | None, limit: int,
                              repair: bool) -> ReconcileChunk: ...
