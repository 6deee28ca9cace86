"""The JetStream event log against a real nats-server (sync_interval: always)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import orjson
import pytest

from tally.core.errors import ConfigError
from tally.core.model import Event
from tally.store.jetstream.eventlog import (
    EventLog,
    decode_run,
    encode_run,
    encode_runs,
    partition_of,
)
from tally_dev.engines import NatsEngine
from tests.engines import EngineFactory

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def events(source: str, seqs: range, items: int = 7) -> list[Event]:
    return [Event(seq=s, counter="like", item=f"post:{s % items}", user=f"u{s}", delta=1,
                  ts=time.time(), region="eu", source=source) for s in seqs]


def test_partition_is_stable_and_in_range() -> None:
    assert partition_of("like", "post:1", 16) == partition_of("like", "post:1", 16)
    assert {partition_of("like", f"post:{i}", 16) for i in range(1000)} == set(range(16))


def test_a_run_round_trips() -> None:
    evs = events("s3", range(5, 9))
    assert decode_run(encode_run("s3", evs)) == evs
    several = events("s1", range(1, 3)) + events("s2", range(7, 9))
    assert decode_run(encode_runs([("s1", several[:2]), ("s2", several[2:])])) == several


def test_a_message_of_the_single_source_format_is_still_read() -> None:
    evs = events("s3", range(5, 7))
    old = orjson.dumps({"source": "s3", "events": [
        [e.seq, e.counter, e.item, e.user, e.delta, e.ts, e.region] for e in evs]})
    assert decode_run(old) == evs


async def test_one_message_per_partition_carries_every_source_of_a_round(nats_url: str) -> None:
    async with open_log(nats_url, "T_RUNS", 4) as log:
        runs = {"s0": events("s0", range(1, 41)), "s1": events("s1", range(1, 41)),
                "s2": events("s2", range(1, 700))}
        touched = await log.publish_runs(runs)
        # Partitions hold 40 + 40 + ~175 events: one message each, one chunk more where a
        # partition's events pass MAX_RUN (500).
        assert touched == 4 and log.published_msgs == 4
        for p in range(4):
            part = await read_all(log, p)
            for src, evs in runs.items():
                assert [e for e in part if e.source == src] == [
                    e for e in evs if partition_of(e.counter, e.item, 4) == p]


@asynccontextmanager
async def open_log(url: str, stream: str, partitions: int) -> AsyncIterator[EventLog]:
    """A started event log on ``stream``, closed when the block ends, whatever the test raised."""
    log = EventLog(url, stream, partitions)
    await log.start()
    try:
        yield log
    finally:
        await log.close()


async def read_all(log: EventLog, partition: int) -> list[Event]:
    reader = await log.reader(partition, 0)
    try:
        out: list[Event] = []
        while msgs := await reader.fetch(100, 0.3):
            out.extend(ev for m in msgs for ev in m.events)
        return out
    finally:
        await reader.close()


async def test_each_partition_holds_its_keys_in_source_order(nats_url: str) -> None:
    async with open_log(nats_url, "T_ORDER", 4) as log:
        sent = events("s0", range(1, 1201)) + events("s1", range(1, 301))
        await log.publish("s0", sent[:1200])
        await log.publish("s1", sent[1200:])
        got: list[Event] = []
        for p in range(4):
            part = await read_all(log, p)
            assert all(partition_of(e.counter, e.item, 4) == p for e in part)
            for src in ("s0", "s1"):
                seqs = [e.seq for e in part if e.source == src]
                assert seqs == sorted(seqs)
            got.extend(part)
        assert sorted((e.source, e.seq) for e in got) == sorted((e.source, e.seq) for e in sent)
        assert log.published_msgs >= 4


async def test_a_republished_batch_is_dropped_by_the_dedupe_window(nats_url: str) -> None:
    async with open_log(nats_url, "T_DUP", 2) as log:
        batch = events("s0", range(1, 51))
        await log.publish("s0", batch)
        await log.publish("s0", batch)  # a relay retry after a lost ack
        assert log.duplicates == log.published_msgs // 2
        assert [len(await read_all(log, p)) for p in range(2)] == [
            sum(partition_of(e.counter, e.item, 2) == p for e in batch) for p in range(2)]


async def test_reader_resumes_after_a_stream_position(nats_url: str) -> None:
    async with open_log(nats_url, "T_RESUME", 1) as log:
        await log.publish("s0", events("s0", range(1, 11)))
        await log.publish("s0", events("s0", range(11, 21)))
        reader = await log.reader(0, 0)
        first = await reader.fetch(1, 1.0)
        await reader.close()
        rest = await log.reader(0, first[0].stream_seq)
        msgs = await rest.fetch(10, 0.5)
        await rest.close()
        assert [e.seq for m in msgs for e in m.events] == list(range(11, 21))
        assert (await log.last_seqs())[0] == msgs[-1].stream_seq


async def test_changing_the_partition_count_of_a_stream_is_refused(nats_url: str) -> None:
    first = EventLog(nats_url, "T_FIXED", 4)
    await first.start()
    await first.close()
    second = EventLog(nats_url, "T_FIXED", 8)
    with pytest.raises(ConfigError, match="partition count is fixed"):
        await second.start()
    await second.close()


async def test_a_recreated_stream_is_read_from_its_start(nats_url: str) -> None:
    async with open_log(nats_url, "T_RESET", 1) as log:
        await log.publish("s0", events("s0", range(1, 6)))
        await log.js.delete_stream("T_RESET")  # lost, then recreated: sequences restart at 1
        await log.ensure_stream()
        await log.publish("s0", events("s0", range(6, 8)))
        reader = await log.reader(0, 5)  # a position committed against the old stream
        msgs = await reader.fetch(10, 0.5)
        await reader.close()
        assert [e.seq for m in msgs for e in m.events] == [6, 7]


async def test_close_after_the_server_died_does_not_hang_or_keep_reconnecting(
        engine_factory: EngineFactory) -> None:
    """A reconnecting client refuses to drain; close() then closes it outright, so it does not
    reconnect for good and send its buffered messages to a server that comes back."""
    server = engine_factory(NatsEngine)
    server.start()
    log = EventLog(server.url, "T_CLOSE", 2, publish_timeout_s=1.0)
    await log.start()
    client = log._nc
    assert client is not None
    server.kill()
    with anyio.fail_after(10):
        while client.is_connected:
            await anyio.sleep(0.01)
        await log.close()
    assert client.is_closed


class StuckClient:
    """A NATS client whose drain and close take one cancellation and go on waiting, as
    nats-py's drain does (it swallows the cancel, then flushes and closes) on a connection that
    no longer answers."""

    is_closed = False

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def drain(self) -> None:
        await self._stuck("drain")

    async def close(self) -> None:
        await self._stuck("close")

    async def _stuck(self, step: str) -> None:
        self.calls.append(step)
        try:
            await anyio.sleep(3600)
        except BaseException:  # the first cancellation: swallowed
            await anyio.sleep(3600)


async def test_close_is_bounded_even_when_the_client_ignores_its_cancellation() -> None:
    """Each step of close() waits ``publish_timeout_s`` at most and is then left behind: a
    server shutting down must not wait for good on a client that will not stop."""
    log = EventLog("nats://127.0.0.1:1", "T_STUCK", 2, publish_timeout_s=0.2)
    client = StuckClient()
    log._nc = client  # type: ignore[assignment]
    with anyio.fail_after(5):
        await log.close()
    assert client.calls == ["drain", "close"] and log._nc is None
