"""The storage roles the service and the workers need, as Protocols. Each backend implements them.

The service core and the workers depend on these only, never on a driver: the embedded SQLite
adapter implements the record roles in one package; the scale-out backends (PostgreSQL shards,
a JetStream log, Redis, PostgreSQL advisory locks for leases) each take one role. Only the
composition root (``tally.bootstrap``) names a backend.

An adapter turns its driver's errors into ``tally.core.errors.Unavailable`` where a caller must
tell "the backend failed, retry" from a bug: workers catch that, never a driver's exception.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tally.core.coalesce import Batch
from tally.core.model import CountKey, Event, Op, OpResult
from tally.core.regions import Placement


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

    def source_groups(self) -> list[list[str]]:
        """Sources that share a fate (one database's): a relay reads, publishes and trims a
        group's rows in one round, so a database that fails holds up only its own group."""

    async def pending(self, source: str, after_seq: int, limit: int) -> list[Event]:
        """Rows of one source not yet trimmed, after ``after_seq``, oldest first."""

    async def pending_many(self, after: Mapping[str, int], limit: int,
                           trim: bool = False) -> dict[str, list[Event]]:
        """``pending`` of several sources (source -> position), up to ``limit`` rows each, one
        round trip per database; sources with no rows are absent. ``trim``: first delete each
        source's rows at or below its position (``trim_many``), in the same round trip: for a
        caller whose position is what it has published."""

    async def trim(self, source: str, through_seq: int) -> int:
        """Delete the rows of ``source`` up to ``through_seq`` (published); returns how many."""

    async def trim_many(self, through: Mapping[str, int]) -> int:
        """``trim`` of several sources (source -> sequence), one round trip per database."""

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


@dataclass(frozen=True)
class LogMessage:
    """One message of a partitioned event log: a run of one source's events."""

    stream_seq: int  # the log's own position of this message, increasing within a partition
    events: list[Event]
    pending: int  # messages after this one in the partition
    stored_at: float  # when the log stored it, epoch seconds


class LogGap(Exception):
    """Delivery skipped messages; the reader must be reopened from the committed position."""


class LogReader(Protocol):
    """Reads one partition in order from a log position."""

    position: int  # the newest log position returned so far

    async def fetch(self, max_msgs: int, timeout_s: float) -> list[LogMessage]:
        """Up to ``max_msgs`` messages after the position; [] when none arrive in time.
        Raises ``LogGap`` when delivery skipped some."""

    async def close(self) -> None: ...


class PartitionedLog(Lifecycle, Protocol):
    """The durable event log between the outboxes and the aggregators, partitioned by
    (counter, item) so one count's events pass through one partition, in order."""

    partitions: int

    async def publish(self, source: str, events: Sequence[Event]) -> int:
        """``publish_runs({source: events})``."""

    async def publish_runs(self, runs: Mapping[str, Sequence[Event]]) -> int:
        """Store several sources' events (each in seq order); returns once every one is stored.
        Within a partition, each source's events are stored in the order given."""

    async def last_seqs(self) -> dict[int, int]:
        """The newest log position stored in each partition (absent when empty)."""

    async def reader(self, partition: int, after_stream_seq: int) -> LogReader:
        """A reader of ``partition`` after that log position."""


class CountCache(Lifecycle, Protocol):
    """Absolute counts in a shared cache, versioned so an older write never replaces a newer one.

    A write it lost after acknowledging it (a restart) shows as a mark below what its writer set;
    raises ``Unavailable`` when the cache cannot be reached."""

    async def get(self, keys: Sequence[CountKey]) -> dict[CountKey, int]: ...

    async def put(self, counts: Mapping[CountKey, int], version: int, mark: str | None = None,
                  floor: int = 0) -> bool:
        """Set absolute counts at ``version``; a key holding a newer version is left alone.

        ``mark`` names a writer's mark: after the counts it rises to ``version``, unless the
        cache holds it below ``floor`` (it lost puts made under it: returns False, mark unmoved)."""

    async def mark(self, name: str) -> int | None:
        """The version up to which the cache holds every put made under mark ``name``; None
        when it has no such mark (or cannot keep one)."""

    async def delete(self, keys: Sequence[CountKey]) -> None: ...


class LeaseSession(Protocol):
    """One member's hold on a family of leases; when the session ends (its process dies), every
    lease it holds is released at once. Methods raise ``Unavailable`` when the session is lost."""

    slot: int  # this member's slot, unique among the live members of the family

    async def members(self) -> int:
        """How many members of the family are alive now."""

    async def try_take(self, index: int) -> bool:
        """Take lease ``index`` if no member holds it."""

    async def give_back(self, index: int) -> None: ...

    async def close(self) -> None:
        """End the session (releasing its leases), bounded in time."""


class Leases(Protocol):
    """Where leases are kept; ``session`` joins a family (``kind``) as one more live member."""

    async def session(self, kind: str) -> LeaseSession: ...


ToggleKey = tuple[str, str, str]  # (counter, user, item)
RecordState = tuple[bool, float]  # (on, decided at)


@dataclass(frozen=True)
class Conflict:
    """A change a returned region acknowledged that lost to a newer epoch's decision."""

    source: str
    seq: int
    counter: str
    item: str
    user: str
    event_on: bool
    event_ts: float
    record_on: bool | None  # the survivor's record when the change came back
    record_ts: float | None
    epoch: int  # of the decision that won


class RegionStore(Protocol):
    """What a region keeps about the others: placement maps, replicated records, conflicts."""

    async def placement(self) -> Placement | None:
        """The map of the highest epoch stored (None: none yet)."""

    async def put_placement(self, placement: Placement) -> bool: ...

    async def apply_remote(self, events: Sequence[Event]) -> int:
        """Other regions' toggle changes into the local records, where newer (idempotent)."""

    async def records(self, keys: Collection[ToggleKey]) -> dict[ToggleKey, RecordState]: ...

    async def force(self, states: Sequence[tuple[ToggleKey, bool, float]]) -> None: ...

    async def record_noops(self, states: Sequence[tuple[ToggleKey, bool, float]]) -> None:
        """Writes that changed nothing, recorded as decisions at their time (no event)."""

    async def add_conflicts(self, conflicts: Sequence[Conflict]) -> None: ...

    async def conflicts(self) -> list[Conflict]: ...


@dataclass(frozen=True, slots=True)
class HeldState:
    """A synchronous toggle's state as its home region acknowledged it, at ``ts`` (after its
    commit): what a peer region holds for a failover to apply."""

    counter: str
    user: str
    item: str
    on: bool
    ts: float


class PeerHold(Lifecycle, Protocol):
    """Another region's log, holding a home region's synchronous changes before they are
    acknowledged (``replication = "sync"``)."""

    async def hold(self, states: Sequence[HeldState]) -> str:
        """Returns once a peer region's log stored them (fsynced): the region that did.
        Raises ``Unavailable`` (with a retry delay) when no peer takes them in time."""


class Witness(Lifecycle, Protocol):
    """The quorum every region shares for automatic failover (etcd: a member per region and a
    witness member in a third place). Every call needs the quorum, so a process cut off from
    the majority gets ``Unavailable``, never a stale answer."""

    async def keepalive(self) -> float:
        """Renew this process's lease (granting a new one if it expired) and return its TTL in
        seconds, counted from before the call was sent."""

    async def alive(self) -> set[str]:
        """Regions with at least one process holding a lease."""

    async def members(self) -> set[str]:
        """Regions that ever held a lease (a region never started is not failed over),
        registered in the same write as their first lease's key in ``alive``."""

    async def placement(self) -> tuple[Placement | None, int]:
        """The placement stored in the quorum and its revision (0: none stored)."""

    async def swap_placement(self, placement: Placement, revision: int) -> bool:
        """Store ``placement`` only if the stored one is still at ``revision``: exactly one of
        several deciders that read the same revision succeeds."""
