"""The engines behind the peers, started from their binaries by ``tally_dev.engines``.

PostgreSQL runs its durable profile (``fsync=on``, ``synchronous_commit=on``). Redis runs twice:
with AOF and ``appendfsync everysec`` (acknowledges before the fsync: may lose the last second on
a machine crash) and with no persistence at all, the ceiling of an in-memory design.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import redis

from tally_dev.engines import PostgresEngine, RedisEngine

Stats = Callable[[], dict[str, float]]


class _VolatileRedis(RedisEngine):
    """Redis with no AOF and no snapshots: nothing survives a restart."""

    def _command(self) -> list[str]:
        cmd = super()._command()
        cmd[cmd.index("--appendonly") + 1] = "no"
        return cmd


def _pg_stats(engine: PostgresEngine) -> Stats:
    def stats() -> dict[str, float]:
        out = engine.psql("SELECT count(*), pg_total_relation_size('likes'), "
                          "pg_total_relation_size('like_counts') FROM likes").strip()
        rows, likes_size, counts_size = (float(x) for x in out.split("|"))
        return {"records": rows, "bytes": likes_size + counts_size,
                "bytes_per_record": (likes_size + counts_size) / rows if rows else 0.0}
    return stats


_COUNT_LIKES = """
local n = 0
for _, k in ipairs(redis.call('KEYS', 'likes:*')) do n = n + redis.call('SCARD', k) end
return n
"""


def _used_memory(url: str) -> float:
    with redis.Redis.from_url(url) as r:
        return float(r.info("memory")["used_memory"])


def _redis_stats(url: str, baseline: float) -> Stats:
    """Memory growth over the like records held (sets and counts together)."""
    def stats() -> dict[str, float]:
        with redis.Redis.from_url(url) as r:
            likes = float(r.eval(_COUNT_LIKES, 0))
        grown = _used_memory(url) - baseline
        return {"records": likes, "bytes": grown, "bytes_per_record": grown / likes if likes else 0.0}
    return stats


@contextlib.contextmanager
def peer_engine(work: Path, peer: str) -> Iterator[tuple[str, str, Stats]]:
    """Yields (peer kind, engine URL, storage probe) for 'pg', 'redis-aof' or 'redis'."""
    if peer == "pg":
        pg = PostgresEngine(work / "engine-pg")
        with pg:
            yield "pg", pg.dsn(), _pg_stats(pg)
        return
    if peer not in ("redis-aof", "redis"):
        raise ValueError(f"unknown peer {peer!r}")
    engine = RedisEngine(work / f"engine-{peer}", appendfsync="everysec") if peer == "redis-aof" \
        else _VolatileRedis(work / f"engine-{peer}")
    with engine:
        yield "redis", engine.url, _redis_stats(engine.url, _used_memory(engine.url))
