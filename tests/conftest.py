"""Shared fixtures: settings in a temporary directory, an in-process app, a real server process."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Protocol

import httpx
import pytest

# Schemathesis's pytest plugin imports its report writers only when the session finishes, where
# pytest's assertion rewriter parses them; after a long session CPython 3.11.7's parser has
# failed there ("AST constructor recursion depth mismatch"), turning a run whose tests all
# passed into a failure. Imported at the start, that parse happens on a fresh interpreter.
import schemathesis.reporting.html.writer
import schemathesis.reporting.junitxml  # noqa: F401
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from tally.api.app import create_app
from tally.bootstrap import Runtime, build
from tally.settings import Settings
from tally_dev import engines
from tally_dev.bench.targets import HttpServer
from tally_dev.engines import free_port
from tests.helpers import app_client

# Property tests check what the code does, not how fast it runs: `make test` runs three pytest
# processes on a shared machine, where a draw or an example may take a second without anything
# being wrong. Hypothesis's timing checks (an example's deadline, the slow-generation health
# check) are off for the whole suite.
hypothesis_settings.register_profile("tally", deadline=None, suppress_health_check=[HealthCheck.too_slow])
hypothesis_settings.load_profile("tally")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Fast windows so tests do not wait; FULL durability as in production."""
    return Settings(data_dir=str(tmp_path / "data"), aggregate_window_ms=5.0)


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    rt = build(settings)
    await rt.start()
    try:
        yield rt
    finally:
        await rt.stop()


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The real ASGI app in this process, lifespan included, over httpx's ASGI transport. Every
    read feeds the heavy-hitter sketch, so its estimates are exact enough to assert on."""
    rt = build(settings)
    rt.service.reader.sample = 1
    async with app_client(create_app(settings, rt)) as c:
        yield c


class ServerProcess(HttpServer):
    """``tally serve`` as a child process on a free loopback port, ready once /readyz answers."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        port = free_port()
        super().__init__(f"server-{port}", [sys.executable, "-m", "tally.cli", "serve"],
                         data_dir.parent, ready_path="/readyz", port=port,
                         env={"TALLY_DATA_DIR": str(data_dir), "TALLY_PORT": str(port),
                              "TALLY_LOG_LEVEL": "WARNING", **(env or {})})
        self.data_dir = data_dir

    def start(self, timeout_s: float = 20.0) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        super().start(timeout_s)
        return self

    def kill(self) -> None:
        """SIGKILL: a crash, for the recovery tests."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class ServerFactory(Protocol):
    def __call__(self, data_dir: Path | None = None,
                 env: dict[str, str] | None = None) -> ServerProcess: ...


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """Makes servers; every one made is stopped at teardown."""
    made: list[ServerProcess] = []

    class Tracked(ServerProcess):
        def __init__(self, data_dir: Path | None = None, env: dict[str, str] | None = None) -> None:
            super().__init__(data_dir or tmp_path / "data", env)
            made.append(self)

    yield Tracked
    for s in made:
        s.stop()


# Every engine a test starts (fixtures, Redis Cluster nodes, bench peers) dies with the test
# process, so an aborted or failed run leaves no server behind.
engines.Engine.die_with_parent = True

pytest_plugins = ["tests.engines", "tests.redis_cluster",  # engine fixtures: pg_engine, ..., redis_cluster
                  "tests.sqlite_fixtures"]  # db, store (SQLite)
