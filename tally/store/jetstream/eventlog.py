"""The durable event log: a NATS JetStream stream partitioned by (counter, item).

Layout. One stream (``settings.nats_stream``) with one subject per partition,
``<stream>.p.<n>`` for n in 0..partitions-1; an event goes to partition
``partition_of(counter, item)``, so all changes of one count pass through one partition and one
aggregator at a time. File storage; the server runs with ``sync_interval: always`` (engines.py and
the cluster config set it), so a publish is acknowledged only after the message is on disk.
Messages are kept ``max_age`` (retention by limits): an aggregator further behind than that
would miss events, which the lag metrics are there to catch long before.

One message carries, for one partition, a contiguous run of events of each of one or more source
shards, each run in source sequence order
(``{"runs": [[source, [[seq, counter, item, user, delta, ts, region], ...]], ...]}``): a relay
round publishes all the sources it read (one database's outbox slots) in one message per
partition, so a message, and its fsync, carries the round's likes of every slot. Messages written
before that format (``{"source": ..., "events": [...]}``, one source) are still read.

Why ordering matters. Consumers do not trust the broker's de-duplication window (two minutes by
default, and nothing across a long outage). Each consumer keeps, per source shard, the newest
source sequence it has applied, and skips anything at or below it (``coalesce(applied=...)``).
That rule is only safe if, within a partition, the *first* copy of each event of a source is
stored after the first copies of all that source's earlier events. Otherwise a retried event
could land behind a later one and be skipped as a duplicate: a lost count. ``publish`` keeps
the rule by construction:

- the caller (the relay) hands it a source's events in sequence order, starting at the oldest
  row not yet trimmed, and does not hand it the next batch until this one is fully acknowledged;
- within a partition the chunks of one batch are published one after another, each awaited
  before the next; only different partitions are published concurrently;
- rows are trimmed from the outbox only after their messages are acknowledged (stored, fsynced).

So whenever any copy of event e is stored, every earlier event of e's source in e's partition is
already stored: either acknowledged in this relay's earlier batches or trimmed, which implies
acknowledged. Later copies (retries, a zombie relay republishing) are skipped by the watermark;
``Nats-Msg-Id`` (source, first and last seq, partition) lets the broker drop most of them early.

Regions. With ``region`` set, each region has a stream of its own in its own JetStream domain
(the region's name), ``<stream>_<REGION>``, whose local subjects are ``<stream>.<region>.p.<n>``;
it also *sources* every peer region's stream across domains (through the leaf node links,
``$JS.<peer>.API``), filtered to the peer's own subjects so nothing comes back around. The
sourcing is JetStream's: it resumes where it stopped after a cut, in the origin's order, so a
partition reads ``<stream>.*.p.<n>``: local and remote runs, each origin's in its order, and the
per-source watermarks (source names carry the origin region) apply every one exactly once.
Each region's stream takes local writes whatever the links do. Sources are set when the stream is
created; later only ``set_sources`` changes them (a failover fences a failed region out).

Reading. An aggregator that owns a partition reads it with an ephemeral pull consumer starting
at a stream sequence it keeps with its watermarks (``workers.partitions.stream_position``), with no acks: the
position it committed together with the counts is where a successor resumes. Consumer sequence
numbers are contiguous, so a message lost in delivery shows as a gap (``LogGap``) and the reader
is reopened from the committed position.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import nats
import orjson
from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from tally.core.errors import ConfigError, Unavailable
from tally.core.model import Event
from tally.store.ports import LogGap, LogMessage

log = logging.getLogger("tally.jetstream")

MAX_RUN = 500  # events per message: well under the server's 1 MB message limit


def partition_of(counter: str, item: str, partitions: int) -> int:
    """Stable across processes and versions (crc32, not Python's salted hash)."""
    return zlib.crc32(f"{counter}\x00{item}".encode()) % partitions


def encode_run(source: str, events: Sequence[Event]) -> bytes:
    return encode_runs([(source, events)])


def encode_runs(runs: Sequence[tuple[str, Sequence[Event]]]) -> bytes:
    return orjson.dumps({"runs": [
        [source, [[e.seq, e.counter, e.item, e.user, e.delta, e.ts, e.region] for e in events]]
        for source, events in runs]})


def decode_run(data: bytes) -> list[Event]:
    body = orjson.loads(data)
    runs = body["runs"] if "runs" in body else [[body["source"], body["events"]]]
    return [Event(seq=r[0], counter=r[1], item=r[2], user=r[3], delta=r[4], ts=r[5], region=r[6],
                  source=source) for source, rows in runs for r in rows]


def stream_name(stream: str, region: str) -> str:
    return f"{stream}_{region.upper()}" if region else stream


T = TypeVar("T")


async def read_to_end(js: JetStreamContext, subject: str, stream: str,
                      decode: Callable[[bytes], list[T]], after_ts: float = 0.0) -> list[T]:
    """Every message ``stream`` holds on ``subject`` (stored after ``after_ts`` if given),
    decoded in order, through a throwaway unacknowledged consumer: for the rare reads of a whole
    history (a rejoin, a failover), not for the aggregators' path."""
    start = (api.DeliverPolicy.BY_START_TIME, datetime.fromtimestamp(after_ts, UTC)
             ) if after_ts else (api.DeliverPolicy.ALL, None)
    sub = await js.pull_subscribe(
        subject, stream=stream,
        config=api.ConsumerConfig(deliver_policy=start[0], opt_start_time=start[1],
                                  ack_policy=api.AckPolicy.NONE, inactive_threshold=30.0,
                                  mem_storage=True, num_replicas=1))
    out: list[T] = []
    try:
        while True:
            try:
                msgs = await sub.fetch(256, timeout=1.0)
            except TimeoutError:
                break
            for m in msgs:
                out += decode(m.data)
            if msgs[-1].metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return out


class EventLog:
    """A connection to the stream: publish runs of events, open partition readers."""

    def __init__(self, url: str, stream: str, partitions: int, replicas: int = 1,
                 max_age_s: float = 7 * 86_400, duplicate_window_s: float = 120.0,
                 publish_timeout_s: float = 5.0, region: str = "",
                 peers: Sequence[str] = ()) -> None:
        self.url = url
        self.region = region
        self.peers = [p for p in peers if p != region]
        self.base = stream
        self.stream = stream_name(stream, region)
        self.partitions = partitions
        self.replicas = replicas
        self.max_age_s = max_age_s
        self.duplicate_window_s = duplicate_window_s
        self.publish_timeout_s = publish_timeout_s
        self.prefix = stream.lower()
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self.published_msgs = 0
        self.duplicates = 0

    def subject(self, partition: int) -> str:
        """Where this process publishes: its own region's subject of the partition."""
        return self._subject(self.region, str(partition))

    def read_subject(self, partition: int) -> str:
        """What a partition's reader takes: every region's subject of the partition."""
        return self._subject("*" if self.region else "", str(partition))

    def _subject(self, region: str, partition: str) -> str:
        return f"{self.prefix}.{region}.p.{partition}" if region else f"{self.prefix}.p.{partition}"

    def source_of(self, peer: str) -> api.StreamSource:
        """The peer region's stream, read across domains, only the subjects it wrote itself."""
        return api.StreamSource(name=stream_name(self.base, peer),
                                filter_subject=f"{self.prefix}.{peer}.>",
                                external=api.ExternalStream(api=f"$JS.{peer}.API", deliver=""))

    async def sources(self) -> dict[str, dict[str, Any]]:
        """Each sourced peer: its lag in messages and seconds since it was last active."""
        info = await self.js.stream_info(self.stream)
        out: dict[str, dict[str, Any]] = {}
        for src in info.sources or []:
            peer = src.name.rsplit("_", 1)[-1].lower()
            # ``active``: nanoseconds since the source last delivered, -1 before it ever did.
            active = src.active if src.active is not None else -1
            out[peer] = {"lag": src.lag or 0, "active_s": active / 1e9 if active >= 0 else -1.0}
        return out

    async def origin_events(self, origin: str, partition: int, after_ts: float = 0.0
                            ) -> list[Event]:
        """Every event a region's stream holds that ``origin`` wrote to one partition, in order,
        from messages stored after ``after_ts`` (a rejoin reads what a survivor never got)."""
        return await read_to_end(self.js, self._subject(origin, str(partition)), self.stream,
                                 decode_run, after_ts)

    async def held(self) -> dict[str, int]:
        """Messages this region's stream holds per origin region: another region's figure for
        its own origin, minus this one's, is what has not been replicated here yet."""
        info = await self.js.stream_info(self.stream, subjects_filter=self._subject("*", "*"))
        out: dict[str, int] = {}
        for subject, n in (info.state.subjects or {}).items():
            origin = subject.split(".")[1]
            out[origin] = out.get(origin, 0) + n
        return out

    async def set_sources(self, peers: Sequence[str]) -> None:
        """Source exactly these peers from now on (a removed one is fenced out; re-added, it
        resumes after what the stream already holds of it)."""
        info = await self.js.stream_info(self.stream)
        config = info.config
        config.sources = [self.source_of(p) for p in peers] or None
        await self.js.update_stream(config)

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise Unavailable("event log is not connected")
        return self._js

    async def start(self) -> None:
        # Every listed server is a way in: on a lost connection the client reconnects to any
        # other (and to those the cluster announces), and retries publishes from the relay.
        servers = [u.strip() for u in self.url.split(",") if u.strip()]
        self._nc = await nats.connect(servers, name="tally", max_reconnect_attempts=-1,
                                      reconnect_time_wait=0.5, connect_timeout=5)
        self._js = self._nc.jetstream(timeout=self.publish_timeout_s)
        await self.ensure_stream()

    async def close(self) -> None:
        """Drain (deliver what is buffered); when the server is gone, close without draining.

        A client that is reconnecting refuses to drain, and left open it would go on
        reconnecting for good and, once a server is back, send what it had buffered. Each step
        is bounded by ``publish_timeout_s`` without waiting for the step to take its
        cancellation: nats-py's ``drain`` swallows one and goes on to flush and close, and on a
        broken connection a ``wait_for`` around it then waited for good (a server that never
        stops)."""
        nc, self._nc, self._js = self._nc, None, None
        if nc is None or nc.is_closed:
            return
        try:
            if await _within(nc.drain(), self.publish_timeout_s):
                return
            error = "drain did not finish in time"
        except (nats.errors.Error, TimeoutError) as exc:
            error = repr(exc)
        log.warning("event log closed without draining", extra={"error": error})
        if not await _within(nc.close(), self.publish_timeout_s):
            log.warning("event log connection left closing", extra={
                "error": f"close did not finish in {self.publish_timeout_s:g} s"})

    async def ensure_stream(self) -> None:
        """Create the stream, or check that an existing one has this partitioning."""
        subjects = [self.subject(p) for p in range(self.partitions)]
        try:
            info = await self.js.stream_info(self.stream)
        except NotFoundError:
            await self.js.add_stream(api.StreamConfig(
                name=self.stream, subjects=subjects, storage=api.StorageType.FILE,
                retention=api.RetentionPolicy.LIMITS, max_age=self.max_age_s,
                num_replicas=self.replicas, duplicate_window=self.duplicate_window_s,
                discard=api.DiscardPolicy.OLD,
                sources=[self.source_of(p) for p in self.peers] or None))
            log.info("event log stream created", extra={"stream": self.stream,
                                                        "partitions": self.partitions})
            return
        if sorted(info.config.subjects or []) != sorted(subjects):
            raise ConfigError(f"stream {self.stream} exists with {len(info.config.subjects or [])} "
                              f"partition subjects, settings say {self.partitions}; the partition "
                              "count is fixed for the life of a stream")

    async def publish(self, source: str, events: Sequence[Event]) -> int:
        return await self.publish_runs({source: events})

    async def publish_runs(self, runs: Mapping[str, Sequence[Event]]) -> int:
        """Publish several sources' events (each in seq order); returns once every message is
        stored; returns the number of partitions written.

        Raises on any failure; the caller retries the same events (see the module docstring).
        """
        parts: dict[int, list[tuple[str, Event]]] = {}
        for source, events in runs.items():  # a partition's list: each source's in seq order
            for ev in events:
                parts.setdefault(partition_of(ev.counter, ev.item, self.partitions), []).append(
                    (source, ev))
        await asyncio.gather(*(self._publish_partition(p, run) for p, run in parts.items()))
        return len(parts)

    async def _publish_partition(self, partition: int, run: list[tuple[str, Event]]) -> None:
        """The chunks one after another, each awaited: a source's events stay in order."""
        for start in range(0, len(run), MAX_RUN):
            chunk = [(source, [ev for _, ev in pairs]) for source, pairs
                     in itertools.groupby(run[start:start + MAX_RUN], lambda p: p[0])]
            msg_id = ",".join(f"{source}:{evs[0].seq}-{evs[-1].seq}" for source, evs in chunk)
            ack = await self.js.publish(self.subject(partition), encode_runs(chunk),
                                        stream=self.stream,
                                        headers={"Nats-Msg-Id": f"{msg_id}:p{partition}"})
            self.published_msgs += 1
            if ack.duplicate:
                self.duplicates += 1

    async def last_seqs(self) -> dict[int, int]:
        """The newest stream sequence stored in each partition (absent when empty)."""
        out: dict[int, int] = {}
        for p in range(self.partitions):
            try:
                msg = await self.js.get_last_msg(self.stream, self.read_subject(p))
            except NotFoundError:
                continue
            if msg.seq is not None:
                out[p] = msg.seq
        return out

    async def reader(self, partition: int, after_stream_seq: int) -> PartitionReader:
        """A reader after ``after_stream_seq``; from the start if the stream is behind that
        position (it was recreated: its sequence numbers restarted). Reading from the start is
        safe, as the per-source watermarks skip whatever was applied already."""
        info = await self.js.stream_info(self.stream)
        if after_stream_seq > info.state.last_seq:
            log.error("stream is behind a committed position: it was recreated; reading it from "
                      "the start", extra={"partition": partition, "position": after_stream_seq,
                                          "last_seq": info.state.last_seq})
            after_stream_seq = 0
        r = PartitionReader(self, partition, after_stream_seq)
        await r.open()
        return r


class PartitionReader:
    """Reads one partition in order from a stream position, with an ephemeral no-ack consumer."""

    def __init__(self, log_: EventLog, partition: int, after_stream_seq: int) -> None:
        self.log = log_
        self.partition = partition
        self.position = after_stream_seq
        self._sub: Any = None
        self._consumer_seq = 0
        self.pending = 0

    async def open(self) -> None:
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.position + 1,
            ack_policy=api.AckPolicy.NONE, inactive_threshold=30.0, mem_storage=True,
            num_replicas=1, max_waiting=1)
        self._sub = await self.log.js.pull_subscribe(self.log.read_subject(self.partition),
                                                     stream=self.log.stream, config=config)
        self._consumer_seq = 0

    async def close(self) -> None:
        """Delete the consumer now rather than leave it to its inactivity timeout."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                info = await asyncio.wait_for(sub.consumer_info(), 2.0)
                await sub.unsubscribe()
                await asyncio.wait_for(self.log.js.delete_consumer(self.log.stream, info.name), 2.0)
            except Exception:  # the connection may be gone; the server drops it when inactive
                log.debug("closing a partition reader failed", exc_info=True)

    async def fetch(self, max_msgs: int, timeout_s: float) -> list[LogMessage]:
        """Up to max_msgs messages after the position; [] when none arrive within the timeout."""
        try:
            msgs = await self._sub.fetch(max_msgs, timeout=timeout_s)
        except TimeoutError:  # nats.errors.TimeoutError, or asyncio's when the deadline passed
            return []
        out = []
        for m in msgs:
            meta = m.metadata
            if meta.sequence.consumer != self._consumer_seq + 1:
                raise LogGap(f"partition {self.partition}: consumer seq {meta.sequence.consumer} "
                             f"after {self._consumer_seq}")
            self._consumer_seq = meta.sequence.consumer
            if meta.sequence.stream <= self.position:
                continue
            self.position = meta.sequence.stream
            self.pending = meta.num_pending
            out.append(LogMessage(meta.sequence.stream, decode_run(m.data), meta.num_pending,
                                  meta.timestamp.timestamp()))
        return out


async def _within(step: Awaitable[Any], timeout_s: float) -> bool:
    """Whether ``step`` finished within ``timeout_s`` (its error raised here). One that did not
    is cancelled and left behind, not awaited: it may ignore the cancellation."""
    task = asyncio.ensure_future(step)
    done, _pending = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved, not logged
        return False
    task.result()
    return True
