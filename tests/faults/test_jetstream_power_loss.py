"""Power loss on a JetStream node: nats-server SIGKILLed under publish load, unsynced writes dropped.

The node is the pinned nats-server (``tally_dev.engines.NatsEngine``) with its store directory on
the filesystem that forgets; the load is Tally's own event-log adapter (``EventLog.publish``, what
the relay calls). A publish counts as acknowledged when ``publish`` returned, i.e. every message of
it got its PubAck. After the cut and a restart the stream is read back partition by partition:
per (source, partition) the stored events must be exactly a prefix of what was sent there, in
order, without a duplicate or a gap, and reach at least the last acknowledged one; the stream must
open with no lost-data report.

Profiles (``TALLY_CHAOS_NATS_PROFILES``): ``always`` is the sync interval Tally runs (engines.py,
deploy/nats.conf) and must lose nothing acknowledged; ``2m`` is nats-server's default, which
acknowledges before the data is on disk: measured, and expected to lose, which shows the check
can see a loss. Rounds, budget and seed as in test_power_loss.py.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

from tally.core.model import Event
from tally.store.jetstream.eventlog import EventLog, partition_of
from tally_dev.engine_bins import missing_binaries
from tally_dev.engines import NatsEngine
from tally_dev.faultfs import FaultFS, available
from tests.faults.harness import report

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.integration]

ROUNDS = int(os.environ.get("TALLY_CHAOS_ROUNDS", "2"))
BUDGET_S = float(os.environ.get("TALLY_CHAOS_SECONDS", "60"))
PROFILES = os.environ.get("TALLY_CHAOS_NATS_PROFILES", "always,2m").split(",")
PUBLISHERS, PARTITIONS, ITEMS = 6, 3, 12
STREAM = "FAULTS"


@pytest.fixture
def nats_on_faultfs() -> Iterator[tuple[FaultFS, Path]]:
    """A FaultFS mount for the JetStream store; the config and log stay off it (they are not
    what is under test, and the log should survive the cut for a post-mortem)."""
    if not os.path.exists("/dev/fuse") or available() is not None:
        pytest.skip(f"faultfs cannot run: {available() or 'no /dev/fuse'}")
    if missing_binaries(("nats",)):
        pytest.skip("no nats-server binary")
    base = Path(tempfile.mkdtemp(prefix="tally-natsfault-"))
    fs = FaultFS(base / "backing", base / "mnt", base / "faultfs.log").mount()
    try:
        yield fs, base
    finally:
        fs.unmount(grace_s=2.0)  # the test is done with the data: no need to wait the daemon out
        shutil.rmtree(base, ignore_errors=True)


class NodeUnderTest(NatsEngine):
    """Up when healthy, or when it reports a stream it cannot recover (its health check then
    fails for good: that is a result to record, not a start-up to wait for)."""

    def _ready(self) -> bool:
        return super()._ready() or UNRECOVERABLE in self.log_since_start()

    def unrecoverable(self) -> bool:
        return UNRECOVERABLE in self.log_since_start()

    def complaint(self) -> str:
        """The server's first warning or error of this start (why the stream was not recovered)."""
        said = [line for line in self.log_since_start().splitlines()
                if "[ERR]" in line or "[WRN]" in line]
        return said[0].split("] ", 2)[-1].strip()[:300] if said else ""


UNRECOVERABLE = "could not be recovered"


def node(fs: FaultFS, base: Path, sync_interval: str) -> NodeUnderTest:
    engine = NodeUnderTest(base / "nats", sync_interval=sync_interval)
    engine.store = fs.mountpoint / "jetstream"
    engine.die_with_parent = True
    return engine


Run = tuple[str, int]  # (source, partition)


@dataclass
class StreamLedger:
    """Per (source, partition), the event seqs sent there in order, and how many of them are
    acknowledged (a publish returned); the stored ones must be a prefix of ``sent`` no shorter."""

    sent: dict[Run, list[int]] = field(default_factory=dict)
    acked: dict[Run, int] = field(default_factory=dict)
    acks: int = 0  # acknowledged publish calls

    def total_acked(self) -> int:
        return sum(self.acked.values())


async def publish_load(log: EventLog, ledger: StreamLedger, sources: list[str], seed: int) -> None:
    """Each publisher owns a source and publishes its events in seq order, one call at a time (as
    the relay does), one to four events per call over random items."""
    async def publisher(source: str, rng: random.Random) -> None:
        seq = 0
        while True:
            events = []
            for _ in range(rng.randint(1, 4)):
                seq += 1
                item = f"post:{rng.randrange(ITEMS)}"
                events.append(Event(seq, "like", item, f"u{seq}", rng.choice((1, -1)), time.time(),
                                    "eu", source))
            for ev in events:
                ledger.sent.setdefault((source, partition_of("like", ev.item, PARTITIONS)),
                                       []).append(ev.seq)
            try:
                await log.publish(source, events)
            except Exception:  # the server is gone: these events' fate is unknown
                return
            for ev in events:
                run = (source, partition_of("like", ev.item, PARTITIONS))
                ledger.acked[run] = ledger.acked.get(run, 0) + 1
            ledger.acks += 1

    async with anyio.create_task_group() as tg:
        for n, source in enumerate(sources):
            tg.start_soon(publisher, source, random.Random(seed * 100 + n))


@dataclass
class StreamCheck:
    losses: int  # acknowledged events not read back
    disorder: list[str]  # runs whose stored events are not a prefix of what was sent
    stored: int
    lost_report: bool  # the server reported lost data for the stream
    stream_missing: bool


async def check_stream(url: str, ledger: StreamLedger) -> StreamCheck:
    log = EventLog(url, STREAM, PARTITIONS)
    await log.start()  # creates the stream if the cut took it away (counted below)
    try:
        info = await log.js.stream_info(STREAM)
        missing = info.state.messages == 0 and ledger.acks > 0
        stored: dict[Run, list[int]] = {}
        for p in range(PARTITIONS):
            reader = await log.reader(p, 0)
            try:
                with anyio.fail_after(120):
                    while msgs := await reader.fetch(200, 0.5):
                        for m in msgs:
                            for ev in m.events:
                                stored.setdefault((ev.source, p), []).append(ev.seq)
            finally:
                await reader.close()
    finally:
        with anyio.move_on_after(10):
            await log.close()
    losses, disorder = 0, []
    for run, sent in ledger.sent.items():
        got = stored.get(run, [])
        if got != sent[:len(got)]:
            disorder.append(f"{run}: stored {got[:20]}... not a prefix of sent {sent[:20]}...")
        losses += max(0, ledger.acked.get(run, 0) - len(got))
    unknown = set(stored) - set(ledger.sent)
    disorder += [f"{run}: stored but never sent" for run in unknown]
    return StreamCheck(losses, disorder, sum(map(len, stored.values())),
                       bool(info.state.lost and info.state.lost.msgs), missing)


async def kill_after_acks(engine: NatsEngine, ledger: StreamLedger, rng: random.Random,
                          sources: list[str], seed: int) -> None:
    log = EventLog(engine.url, STREAM, PARTITIONS, publish_timeout_s=2.0)
    await log.start()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(publish_load, log, ledger, sources, seed)
            target = ledger.acks + rng.randint(1, 150)
            with anyio.fail_after(120):
                while ledger.acks < target:
                    await anyio.sleep(0.002)
            await anyio.sleep(rng.uniform(0, 0.03))
            await anyio.to_thread.run_sync(engine.kill)
            tg.cancel_scope.cancel()  # publishes in flight stay in doubt (unacknowledged)
    finally:
        with anyio.move_on_after(5), contextlib.suppress(Exception):
            await log.close()


@pytest.mark.parametrize("sync_interval", PROFILES)
async def test_jetstream_power_loss_loses_no_acknowledged_message(
        nats_on_faultfs: tuple[FaultFS, Path], sync_interval: str) -> None:
    fs, base = nats_on_faultfs
    engine = node(fs, base, sync_interval)
    seed = int(os.environ.get("TALLY_CHAOS_SEED", str(time.time_ns() % 1_000_000)))
    print(f"seed {seed}")
    rng = random.Random(seed)
    ledger = StreamLedger()
    rounds = losses = undone = stored = lost_reports = streams_lost = 0
    disorder: list[str] = []
    complaint = ""
    started = time.monotonic()
    await anyio.to_thread.run_sync(engine.start)
    log = EventLog(engine.url, STREAM, PARTITIONS)
    await log.start()  # the stream, then a clean restart: its own files are on disk whatever
    await log.close()  # the sync interval, so a loss shows as messages missing from it
    await anyio.to_thread.run_sync(engine.stop)
    await anyio.to_thread.run_sync(engine.start)
    try:
        while rounds < ROUNDS and (rounds == 0 or time.monotonic() - started < BUDGET_S):
            # New sources each round: a source's events are numbered by one process's life.
            sources = [f"r{rounds}w{n}" for n in range(PUBLISHERS)]
            await kill_after_acks(engine, ledger, rng, sources, seed + rounds)
            undone += await anyio.to_thread.run_sync(fs.cut)
            await anyio.to_thread.run_sync(engine.start)
            if engine.unrecoverable():  # every acknowledged event is gone with the stream
                losses, streams_lost, rounds = ledger.total_acked(), streams_lost + 1, rounds + 1
                complaint = engine.complaint()
                break
            check = await check_stream(engine.url, ledger)
            # Cumulative: every earlier round's acknowledged events are checked again.
            losses, stored = check.losses, check.stored
            disorder += check.disorder
            lost_reports += check.lost_report
            streams_lost += check.stream_missing
            rounds += 1
            if check.stream_missing or check.disorder:
                break  # later rounds would only repeat it
    finally:
        await anyio.to_thread.run_sync(engine.stop)
    report("jetstream-power-loss", sync_interval=sync_interval, seed=seed, rounds=rounds,
           acknowledged_publishes=ledger.acks, acknowledged_events=ledger.total_acked(),
           stored_events=stored, unsynced_bytes_dropped=undone, losses=losses,
           out_of_order_runs=len(disorder), lost_data_reports=lost_reports,
           rounds_stream_gone=streams_lost, server_error=complaint)
    assert ledger.acks > rounds
    if sync_interval != "always":
        # Nothing is left unsynced under ``always`` (every write is synced before its ack), so
        # this profile is what shows that the cut drops data and the check sees it.
        assert undone > 0 and (losses > 0 or streams_lost > 0)
    else:
        assert losses == 0, f"{losses} acknowledged events lost (seed {seed})"
        assert disorder == [], disorder[:5]
        assert lost_reports == 0 and streams_lost == 0
