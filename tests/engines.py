"""Pytest fixtures for real engines: one throwaway server per engine per session, fresh state per test.

Loaded from ``tests/conftest.py`` through ``pytest_plugins``. The session servers live in a
directory under /tmp (PostgreSQL runs as an unprivileged user, which must be able to reach it) and
are stopped and removed at the end. Tests that crash an engine make their own with
``engine_factory`` instead of killing the shared one.

A missing binary skips the test with the install command, except under CI (``CI`` set), where it
fails: CI installs the engines first (``make engines``), so a missing one is a broken setup.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

from tally_dev.engines import Engine, NatsEngine, PostgresEngine, RedisEngine, missing_binaries

E = TypeVar("E", bound=Engine)
_names = itertools.count(1)


class EngineFactory(Protocol):
    def __call__(self, cls: type[E], **kwargs: Any) -> E: ...


def require(engine: str) -> None:
    """Skip (or, under CI, fail) when the engine's binary is missing, saying how to install it."""
    missing = missing_binaries((engine,))
    if missing:
        reason = str(missing[0])
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def engines_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="tally-engines-"))
    base.chmod(0o711)  # searchable (not listable) by the unprivileged PostgreSQL user
    yield base
    shutil.rmtree(base, ignore_errors=True)


def session_engine(cls: type[E], root: Path, **kwargs: Any) -> Iterator[E]:
    """One engine shared by the session: skipped (or failed under CI) when its binary is missing,
    killed with the test process if that dies, stopped at the end otherwise."""
    require(cls.name)
    engine = cls(root, **kwargs)
    engine.die_with_parent = True
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def pg_engine(engines_dir: Path) -> Iterator[PostgresEngine]:
    yield from session_engine(PostgresEngine, engines_dir / "pg-session")


@pytest.fixture(scope="session")
def redis_engine(engines_dir: Path) -> Iterator[RedisEngine]:
    yield from session_engine(RedisEngine, engines_dir / "redis-session", appendfsync="always")


@pytest.fixture(scope="session")
def nats_engine(engines_dir: Path) -> Iterator[NatsEngine]:
    yield from session_engine(NatsEngine, engines_dir / "nats-session")


@pytest.fixture
def pg_database(pg_engine: PostgresEngine) -> Iterator[Callable[[], str]]:
    """Makes fresh empty databases on the session server (returns DSNs); drops them afterwards."""
    made: list[str] = []

    def make() -> str:
        name = f"t{os.getpid()}_{next(_names)}"
        made.append(name)
        return pg_engine.create_database(name)

    yield make
    for name in made:
        pg_engine.drop_database(name)


@pytest.fixture
def pg_dsns(pg_database: Callable[[], str]) -> list[str]:
    """Two fresh databases: two physical shards on one server."""
    return [pg_database(), pg_database()]


@pytest.fixture(scope="session")
def _pg_shared_pair(pg_engine: PostgresEngine) -> list[str]:
    return [pg_engine.create_database(f"shared{os.getpid()}_{n}") for n in range(2)]


_EMPTY_TABLES = """DO $$ DECLARE t text; BEGIN
  FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'tally_meta'
  LOOP EXECUTE format('DELETE FROM %I', t); END LOOP; END $$"""


@pytest.fixture
def pg_shared_dsns(pg_engine: PostgresEngine, _pg_shared_pair: list[str]) -> list[str]:
    """Two databases kept for the session, their tables emptied for each test (schema and
    ``tally_meta`` kept): much faster than creating databases when many tests need them."""
    for dsn in _pg_shared_pair:
        pg_engine.psql(_EMPTY_TABLES, database=dsn.rsplit("/", 1)[1])
    return _pg_shared_pair


@pytest.fixture
def redis_url(redis_engine: RedisEngine) -> str:
    """The session Redis, emptied for this test."""
    redis_engine.flushall()
    return redis_engine.url


@pytest.fixture
async def nats_url(nats_engine: NatsEngine) -> AsyncIterator[str]:
    """The session NATS, with every JetStream stream deleted before the test."""
    import nats

    nc = await nats.connect(nats_engine.url)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            if info.config.name:
                await js.delete_stream(info.config.name)
    finally:
        await nc.close()
    yield nats_engine.url


@pytest.fixture
def engine_factory(engines_dir: Path) -> Iterator[EngineFactory]:
    """Private engines for crash tests: ``engine_factory(RedisEngine, appendfsync='always')``.

    Each gets its own directory; all are stopped at teardown (their data is removed with the
    session directory).
    """
    made: list[Engine] = []

    def make(cls: type[E], **kwargs: Any) -> E:
        require(cls.name)
        engine = cls(engines_dir / f"{cls.name}-{next(_names)}", **kwargs)
        engine.die_with_parent = True
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.stop()
