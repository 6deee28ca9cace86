"""What every runtime (embedded, or a cluster role) shares: the shape the HTTP app needs, the
schema from settings, and periodic jobs that stop cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from tally.core.hotkeys import SpaceSaving
from tally.core.model import Counter, Kind, Schema
from tally.metrics import Metrics
from tally.service.counters import CounterService
from tally.settings import Settings
from tally.store.postgres.build import PostgresConfig

log = logging.getLogger("tally")


def schema_of(settings: Settings) -> Schema:
    counters = [Counter(c.name, Kind(c.kind), c.dedupe_window_s)
                for c in settings.counter_defs().values()]
    return Schema(counters, settings.item_types)


def periodic(period_s: float, job: Callable[[], Awaitable[object]]) -> asyncio.Task[None]:
    """Run ``job`` every ``period_s`` until cancelled; a failing run is logged, not fatal."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await job()
            except Exception:
                log.exception("periodic job failed", extra={"job": job.__name__})

    return asyncio.create_task(loop(), name=f"tally-{job.__name__}")


async def cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the ``periodic`` tasks and wait for each to end, so stop() closes no store under a
    running job; empties the list so a second stop() is a no-op."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    tasks.clear()


class AppRuntime(Protocol):
    """What the HTTP app needs from a runtime, embedded or cluster (any role)."""

    settings: Settings
    metrics: Metrics
    hot: SpaceSaving

    @property
    def process(self) -> str:
        """What this process runs, for its logs (the event loop's stalls name it)."""

    @property
    def service(self) -> CounterService | None:
        """None in roles that serve no API (relay, aggregator)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def readiness(self) -> tuple[bool, dict[str, object]]:
        """(ready, details such as lag) for /readyz."""


def postgres_config(settings: Settings) -> PostgresConfig:
    """The PostgreSQL stores' configuration, for the runtime and the operators' tools alike."""
    return PostgresConfig(
        dsns=list(settings.postgres_dsns), logical_shards=settings.logical_shards,
        shard_map=list(settings.shard_map), pool_max=settings.postgres_pool_max,
        synchronous_commit=settings.postgres_synchronous_commit,
        outbox_slots=settings.outbox_slots, failover_s=settings.postgres_failover_s,
        region=settings.region_name, application_name=f"tally-{settings.role}")
