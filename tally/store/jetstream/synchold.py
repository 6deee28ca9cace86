"""Synchronous replication (``replication = "sync"``, docs/regions.md): a home region's changes
held by a peer region's JetStream before they are acknowledged.

Layout. Every region keeps, in its own JetStream domain, one *holding stream* per peer region,
``<STREAM>_SYNC_<PEER>``, on the subject ``<prefix>_sync.<peer>``. A home region publishes a
request's synchronous states on ``<prefix>_sync.<itself>``; no stream of its own listens there,
so the message crosses the leaf-node link (plain subjects cross leaf nodes; only each domain's
JetStream API is kept apart) and is stored by the peers' holding streams. The acknowledgement
(PubAck) is the reply of the stream that stored it, sent after its write reached the disk
(``sync_interval: always``), and it names the stream's domain: an acknowledgement from this
region's own domain would prove nothing and is refused. With several peers the first
acknowledgement answers: one other region holding the change is the promise.

Nothing here replicates by our own means: one JetStream publish, awaited. The holding stream is
read only by a failover (``tally.regions_admin``), which fences it (no more acknowledgements for
the failed region) and applies to the survivor's records what it holds and the survivor lacks;
the rejoin lifts the fence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import nats
import orjson
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js import api
from nats.js.errors import BadRequestError, NotFoundError

from tally.core.errors import Unavailable
from tally.store.jetstream.eventlog import read_to_end, stream_name
from tally.store.ports import HeldState

log = logging.getLogger("tally.jetstream")

# How long a synchronous write waits for a peer's acknowledgement. A link that is up answers in
# an inter-region round trip plus an fsync; a cut link (packets dropped) keeps the leaf
# connection open until its pings fail, so without a bound the client would wait for that.
HOLD_TIMEOUT_S = 2.0
# What a refused synchronous write tells the client to wait before retrying.
RETRY_AFTER_S = 1.0


def hold_subject(stream: str, origin: str) -> str:
    return f"{stream.lower()}_sync.{origin}"


def holding_stream(stream: str, origin: str) -> str:
    return stream_name(f"{stream}_SYNC", origin)


def encode_states(origin: str, states: Sequence[HeldState]) -> bytes:
    return orjson.dumps({"origin": origin, "states": [
        [s.counter, s.user, s.item, s.on, s.ts] for s in states]})


def decode_states(data: bytes) -> list[HeldState]:
    return [HeldState(r[0], r[1], r[2], bool(r[3]), float(r[4]))
            for r in orjson.loads(data)["states"]]


class JetStreamHold:
    """Publishes this region's synchronous states to its peers' holding streams (``PeerHold``),
    and keeps, in its own domain, the holding streams of its peers."""

    def __init__(self, url: str, stream: str, region: str, peers: Sequence[str],
                 max_age_s: float, connect_in_background: bool = False) -> None:
        """``connect_in_background``: ``start`` returns at once and connects (and creates the
        holding streams) in a task, retrying: an API serves reads, and asynchronous writes, with
        its region's NATS down; synchronous writes are refused (503) until it is connected."""
        self.url = url
        self.stream = stream
        self.region = region
        self.peers = [p for p in peers if p != region]
        self.max_age_s = max_age_s
        self.connect_in_background = connect_in_background
        self._nc: NATS | None = None
        self._connecting: asyncio.Task[None] | None = None

    @property
    def nc(self) -> NATS:
        if self._nc is None:
            raise Unavailable("the synchronous replication link is not connected",
                              retry_after_s=RETRY_AFTER_S)
        return self._nc

    async def start(self) -> None:
        if self.connect_in_background:
            self._connecting = asyncio.create_task(self._connect_until_done(),
                                                   name="tally-sync-connect")
        else:
            await self._connect()

    async def _connect_until_done(self) -> None:
        delay = 0.5
        while self._nc is None:  # ends once connected, or when cancelled by close()
            try:
                await self._connect()
            except Exception as exc:
                log.warning("synchronous replication link not connected; retrying", extra={
                    "error": repr(exc), "retry_in_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _connect(self) -> None:
        servers = [u.strip() for u in self.url.split(",") if u.strip()]
        nc = await nats.connect(servers, name="tally-sync", max_reconnect_attempts=-1,
                                reconnect_time_wait=0.5, connect_timeout=5)
        try:
            await self._ensure_holding(nc)
        except BaseException:
            await nc.close()
            raise
        self._nc = nc

    async def _ensure_holding(self, nc: NATS) -> None:
        js = nc.jetstream(timeout=5.0)
        for peer in self.peers:
            try:
                await js.stream_info(holding_stream(self.stream, peer))
                continue  # left as it is: a failover may have fenced it
            except NotFoundError:
                pass
            try:
                await js.add_stream(api.StreamConfig(
                    name=holding_stream(self.stream, peer),
                    subjects=[hold_subject(self.stream, peer)], storage=api.StorageType.FILE,
                    retention=api.RetentionPolicy.LIMITS, max_age=self.max_age_s,
                    discard=api.DiscardPolicy.OLD, num_replicas=1))
            except BadRequestError as exc:  # another process of this region created it first
                if exc.err_code != 10058:  # "stream name already in use"
                    raise

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connecting
            self._connecting = None
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.drain()
        self._nc = None

    async def hold(self, states: Sequence[HeldState]) -> str:
        js = self.nc.jetstream(timeout=HOLD_TIMEOUT_S)
        try:
            ack = await js.publish(hold_subject(self.stream, self.region),
                                   encode_states(self.region, states),
                                   stream=holding_stream(self.stream, self.region))
        except (NatsError, TimeoutError) as exc:
            raise Unavailable(f"no peer region acknowledged this synchronous write: {exc!r}; "
                              "it is committed here and replicates when a peer is back, but is "
                              "not acknowledged until one holds it", retry_after_s=RETRY_AFTER_S
                              ) from exc
        if not ack.domain or ack.domain == self.region:
            raise Unavailable(f"synchronous write acknowledged by domain {ack.domain!r}, not by a "
                              "peer region: a holding stream for this region's own changes "
                              "exists in this region (misconfigured)",
                              retry_after_s=RETRY_AFTER_S)
        return ack.domain

    async def fence(self, origin: str, fenced: bool) -> None:
        """Stop (or resume) holding ``origin``'s states in this region: fenced, the holding
        stream listens on another subject, so a failed-over region that is still running gets
        no acknowledgement from here and refuses its synchronous writes. What it holds stays
        until the fence is lifted (a rejoin, after the failover applied it): then it is purged,
        so a later failover reads only what was held since."""
        js = self.nc.jetstream(timeout=5.0)
        name = holding_stream(self.stream, origin)
        if not fenced:  # the failover applied what it held; the rejoin reconciled the rest
            await js.purge_stream(name)
        info = await js.stream_info(name)
        subject = hold_subject(self.stream, origin)
        info.config.subjects = [f"{subject}.fenced" if fenced else subject]
        await js.update_stream(info.config)

    async def held(self, origin: str, domain: str | None = None) -> list[HeldState]:
        """Every state the holding stream of ``origin`` stores, in order: in this region's
        domain, or in ``domain``'s (read across the leaf link, as sources do)."""
        js = self.nc.jetstream(timeout=5.0, domain=domain)
        return await read_to_end(js, hold_subject(self.stream, origin),
                                 holding_stream(self.stream, origin), decode_states)
