"""The load generator: worker processes, open loop (fixed arrival rate) or closed loop.

Open loop: operation k of a worker is *intended* at ``start + k / rate``, and its latency is
measured from that intended time, not from when a connection was free to send it. A server that
stalls therefore shows its queueing delay in the percentiles instead of silently slowing the
generator down (coordinated omission). How long each operation waited in the generator after its
intended time, for a free connection, is recorded apart (``generator_wait``): a pool too small
for the rate at the server's latency queues requests in the generator, and that figure shows it.
Closed loop: every connection sends its next operation as soon as the previous one is answered;
it finds the maximum throughput, and its latencies are service times only.

Errors (HTTP >= 400, broken connections, timeouts, operations still queued or in flight when the
run ends) are counted by reason, never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing as mp
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import uvloop

from tally_dev.bench.hist import Recorder
from tally_dev.bench.http1 import ConnectionLost, Http1Connection
from tally_dev.bench.workloads import Generator, Op, Params


@dataclass(frozen=True)
class RunSpec:
    name: str
    host: str
    port: int
    preset: str
    mode: str = "closed"  # "open" (fixed arrival rate) or "closed" (max throughput)
    rate: float = 0.0  # operations per second over all workers, open loop only
    duration_s: float = 10.0
    warmup_s: float = 1.0  # run but not recorded: connections warm, caches filled
    connections: int = 32
    workers: int = 1
    seed: int = 1
    timeout_s: float = 10.0
    run_id: int = 0  # distinct per run against one server: fresh users (see workloads.Generator)
    grace_s: float = 5.0  # after the end, how long queued operations may still complete
    params: Params = field(default_factory=Params)

    def __post_init__(self) -> None:
        if self.mode not in ("open", "closed"):
            raise ValueError("mode must be 'open' or 'closed'")
        if self.mode == "open" and self.rate <= 0:
            raise ValueError("an open-loop run needs a rate > 0")
        if self.connections < self.workers:
            raise ValueError("need at least one connection per worker")
        if not 0 <= self.run_id < 3_000_000 or self.workers > 256:
            raise ValueError("run_id must be in [0, 3e6) and workers at most 256 (user ids: int64)")


@dataclass
class RunResult:
    spec: RunSpec
    recorder: Recorder
    cpu_s: list[float]  # CPU seconds used by each worker process
    wall_s: float  # as data: ``report.run_dict``


_now = time.monotonic  # nanosecond clock; uvloop's loop.time() has millisecond resolution


class _Slot:
    """One connection and the bookkeeping the watchdog needs."""

    def __init__(self, conn: Http1Connection) -> None:
        self.conn = conn
        self.started = 0.0  # loop time the current request was written; 0 when idle
        self.timed_out = False


class _Worker:
    def __init__(self, spec: RunSpec, index: int, progress: Any) -> None:
        self.spec = spec
        self.index = index
        self.progress = progress  # shared array: [completed, errors] per worker
        self.gen = Generator(spec.preset, spec.params, spec.seed, index,
                             spec.run_id)
        self.rec = Recorder()
        self.slots: list[_Slot] = []
        self.begin = 0.0

    def _second(self, t: float) -> int:
        return math.floor(t - self.begin)

    async def connect(self) -> None:
        n = self.spec.connections // self.spec.workers
        n += 1 if self.index < self.spec.connections % self.spec.workers else 0
        for _ in range(n):
            self.slots.append(_Slot(await Http1Connection.open(self.spec.host, self.spec.port)))

    async def _reconnect(self, slot: _Slot) -> None:
        slot.conn.close()
        slot.timed_out = False
        try:
            slot.conn = await Http1Connection.open(self.spec.host, self.spec.port)
        except OSError:
            await asyncio.sleep(0.1)  # the next request on this slot fails and retries

    async def send(self, slot: _Slot, op: Op, t_ref: float) -> None:
        kind, requests = op
        second = self._second(t_ref)
        self.rec.sent += 1
        if slot.conn.closed:
            await self._reconnect(slot)
        if self.spec.mode == "open" and second >= 0:
            self.rec.waited(_now() - t_ref)
        try:
            for data in requests:
                slot.started = _now()
                status = await slot.conn.request(data)
                if status >= 400:
                    self._error(f"http {status}", second)
                    return
        except (ConnectionLost, OSError) as exc:
            self._error("timeout" if slot.timed_out else f"connection: {type(exc).__name__}",
                        second)
            await self._reconnect(slot)
            return
        finally:
            slot.started = 0.0
        if second >= 0:
            self.rec.ok(kind, second, _now() - t_ref)
            self.progress[2 * self.index] += 1

    def _error(self, reason: str, second: int) -> None:
        self.rec.error(reason, max(second, 0))
        self.progress[2 * self.index + 1] += 1

    async def watchdog(self) -> None:
        """Closes connections whose request has waited longer than the timeout."""
        while True:
            await asyncio.sleep(min(0.25, self.spec.timeout_s / 4))
            now = _now()
            for slot in self.slots:
                if slot.started and now - slot.started > self.spec.timeout_s:
                    slot.timed_out = True
                    slot.conn.close()

    async def closed_loop(self, end: float) -> None:
        async def one(slot: _Slot) -> None:
            while _now() < end:
                await self.send(slot, self.gen.next(), _now())

        await self._finish([asyncio.ensure_future(one(s)) for s in self.slots], end)

    async def open_loop(self, start: float, end: float) -> None:
        queue: asyncio.Queue[tuple[float, Op] | None] = asyncio.Queue()

        async def one(slot: _Slot) -> None:
            while (item := await queue.get()) is not None:
                await self.send(slot, item[1], item[0])

        tasks = [asyncio.ensure_future(one(s)) for s in self.slots]
        interval = self.spec.workers / self.spec.rate
        k, t = 0, start + interval * self.index / self.spec.workers
        while t < end:
            now = _now()
            if t > now:
                await asyncio.sleep(t - now)
            queue.put_nowait((t, self.gen.next()))
            k += 1
            t = start + interval * (k + self.index / self.spec.workers)
        for _ in tasks:
            queue.put_nowait(None)
        await self._finish(tasks, end, queue)

    async def _finish(self, tasks: Sequence[asyncio.Future[None]], end: float,
                      queue: asyncio.Queue[tuple[float, Op] | None] | None = None) -> None:
        """Waits up to the grace period; whatever is still queued or in flight is an error."""
        _done, pending = await asyncio.wait(tasks, timeout=end - _now() + self.spec.grace_s)
        if queue is not None:
            while not queue.empty():
                item = queue.get_nowait()
                if item is not None:
                    self._error("unsent at end (queued behind a slow server)",
                                self._second(item[0]))
        for slot in self.slots:
            if slot.started:
                self._error("in flight at end", self._second(end))
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self, barrier: Any) -> None:
        await self.connect()
        await asyncio.to_thread(barrier.wait, 60)
        start = _now() + 0.05
        self.begin = start + self.spec.warmup_s
        end = self.begin + self.spec.duration_s
        dog = asyncio.ensure_future(self.watchdog())
        if start > _now():
            await asyncio.sleep(start - _now())
        if self.spec.mode == "open":
            await self.open_loop(start, end)
        else:
            await self.closed_loop(end)
        dog.cancel()
        for slot in self.slots:
            slot.conn.close()


def _worker_main(spec: RunSpec, index: int, barrier: Any, progress: Any, results: Any) -> None:
    cpu0 = time.process_time()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            worker = runner.run(_make_worker(spec, index, progress))
            runner.run(worker.run(barrier))
        results.put((index, worker.rec.encode(), time.process_time() - cpu0, None))
    except BaseException as exc:
        with contextlib.suppress(Exception):
            barrier.abort()
        results.put((index, None, time.process_time() - cpu0, f"{type(exc).__name__}: {exc}"))


async def _make_worker(spec: RunSpec, index: int, progress: Any) -> _Worker:
    return _Worker(spec, index, progress)


def run(spec: RunSpec, show_progress: bool = True) -> RunResult:
    """Runs one measurement with ``spec.workers`` processes and merges what they recorded."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(spec.workers)
    progress = ctx.Array("q", 2 * spec.workers, lock=False)
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker_main, args=(spec, i, barrier, progress, results),
                         name=f"tally-bench-{i}", daemon=True) for i in range(spec.workers)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    got: dict[int, tuple[Any, float, str | None]] = {}
    limit = spec.warmup_s + spec.duration_s + spec.grace_s + 90
    while len(got) < spec.workers:
        if show_progress:
            _progress_line(spec, progress, time.monotonic() - t0)
        with contextlib.suppress(Exception):
            index, data, cpu, err = results.get(timeout=1.0)
            got[index] = (data, cpu, err)
        if time.monotonic() - t0 > limit or (results.empty() and not any(p.is_alive() for p in procs)):
            break
    wall = time.monotonic() - t0
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
    if show_progress:
        print(file=sys.stderr)
    failures = [e for _d, _c, e in got.values() if e] + (
        ["worker(s) gave no result"] if len(got) < spec.workers else [])
    if failures:
        raise RuntimeError(f"{spec.name}: load generator failed: {failures[0]}")
    rec = Recorder()
    for data, _cpu, _err in got.values():
        rec.merge(Recorder.decode(data))
    return RunResult(spec, rec, [c for _d, c, _e in got.values()], wall)


def _progress_line(spec: RunSpec, progress: Any, elapsed: float) -> None:
    ok = sum(progress[0::2])
    err = sum(progress[1::2])
    total = spec.warmup_s + spec.duration_s
    rate = ok / max(elapsed - spec.warmup_s - 1.0, 1e-9) if elapsed > spec.warmup_s + 1.5 else 0.0
    target = f"{spec.rate:,.0f}/s offered" if spec.mode == "open" else "closed loop"
    print(f"\r  {spec.name:<40} {min(elapsed, total):5.1f}/{total:.0f}s  ok {ok:>9,}  "
          f"err {err:>6,}  ~{rate:>9,.0f}/s  ({target})   ", end="", file=sys.stderr, flush=True)


def spec_dict(spec: RunSpec) -> dict[str, Any]:
    return asdict(spec)
