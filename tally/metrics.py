"""Prometheus metrics: request counts and latency per endpoint, plus state read at scrape time.

Gauges that describe state (aggregator lag, cache hit ratio, hot items) are computed when
scraped, by a collector, so the hot path pays nothing for them.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("tally.loop")

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

Sample = tuple[str, str, str, float, dict[str, str]]  # (kind, name, help, value, labels)


class _StateCollector(Collector):
    def __init__(self, sample: Callable[[], list[Sample]]) -> None:
        self._sample = sample

    def collect(self) -> Iterator[Metric]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for kind, name, doc, value, labels in self._sample():
            fam = families.get(name)
            if fam is None:
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                fam = cls(name, doc, labels=sorted(labels))
                families[name] = fam
            fam.add_metric([labels[k] for k in sorted(labels)], value)
        yield from families.values()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("tally_http_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram("tally_http_request_seconds", "HTTP request latency by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.loop_lag = Histogram("tally_event_loop_lag_seconds",
                                  "How late the event loop woke a 10 ms sleeper",
                                  buckets=LATENCY_BUCKETS, registry=self.registry)
        self.sync_wait = Histogram("tally_region_sync_wait_seconds",
                                   "Time a synchronous write waited for a peer region's log to "
                                   "hold it (replication = sync)", buckets=LATENCY_BUCKETS,
                                   registry=self.registry)
        self.gc_pause = Histogram("tally_gc_pause_seconds",
                                  "Garbage collections by generation: each stops every thread",
                                  ["generation"], buckets=LATENCY_BUCKETS, registry=self.registry)

    def add_state(self, sample: Callable[[], list[Sample]]) -> None:
        self.registry.register(_StateCollector(sample))

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def watch_loop_lag(metrics: Metrics, interval_s: float = 0.01, warn_s: float = 0.05,
                         role: str = "api") -> None:
    """Measures how late the event loop runs a timer due every ``interval_s``, until cancelled.
    Every request that arrives during a stall waits that long, so stalls set the tail latency; a
    stall over ``warn_s`` is logged with its length, to be matched with what ran at that moment,
    and with the process it happened in (``role``: what the process runs, and its pid: the API
    processes of ``tally serve --workers N`` log to one stream; the likes writers run no probe).

    A bare timer callback, not a task that sleeps: the probe runs in every process a hundred
    times a second, and a task's wake-up (its future, its step) cost several times the callback's,
    a visible share of an idle relay's or aggregator's CPU."""
    loop = asyncio.get_running_loop()
    observe = metrics.loop_lag.observe
    where = {"role": role, "pid": os.getpid()}
    timer: asyncio.TimerHandle | None = None

    def wake(due: float) -> None:
        nonlocal timer
        now = loop.time()
        lag = max(now - due, 0.0)
        observe(lag)
        if lag > warn_s:
            log.warning("event loop stalled", extra={"stall_ms": round(lag * 1000, 1), **where})
        timer = loop.call_at(now + interval_s, wake, now + interval_s)

    first = loop.time() + interval_s
    timer = loop.call_at(first, wake, first)
    try:
        await loop.create_future()  # never set: the probe runs until this task is cancelled
    finally:
        timer.cancel()


def watch_gc(metrics: Metrics) -> Callable[[], None]:
    """Times every garbage collection (a pause of the whole process: a full one walks every
    tracked object) into ``tally_gc_pause_seconds``; returns the function that stops it."""
    started = [0.0]
    by_gen = [metrics.gc_pause.labels(generation=str(g)) for g in range(3)]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            by_gen[info["generation"]].observe(time.perf_counter() - started[0])

    gc.callbacks.append(callback)
    return lambda: gc.callbacks.remove(callback)
