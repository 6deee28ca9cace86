"""Prometheus metrics: request counts and latency per endpoint, plus state read at scrape time.

Gauges that describe state (aggregator lag, cache hit ratio, hot items) are computed when
scraped, by a collector, so the hot path pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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

    def add_state(self, sample: Callable[[], list[Sample]]) -> None:
        self.registry.register(_StateCollector(sample))

    def render(self) -> bytes:
        return generate_latest(self.registry)
