"""The engines behind the peers, started from their binaries by ``tally_dev.engines``.

PostgreSQL runs its durable profile (``fsync=on``, ``synchronous_commit=on``). Redis runs twice:
AOF with ``appendfsync always`` (fsynced before it answers, Tally's durability) and ``everysec``
(answers before the fsync: may lose the last second on a machine crash). ``bare`` has no engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import redis

from tally_dev.engines import PostgresEngine, RedisEngine

Stats = Callable[[], dict[str, float]]
PEERS = ("bare", "redis-always", "redis-everysec", "pg")


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
    """Memory growth over the like records held (both sets and the counts together)."""
    def stats() -> dict[str, float]:
        with redis.Redis.from_url(url) as r:
            likes = float(r.eval(_COUNT_LIKES, 0))
        grown = _used_memory(url) - baseline
        return {"records": likes, "bytes": grown, "bytes_per_record": grown / likes if likes else 0.0}
    return stats


@contextlib.contextmanager
def peer_engine(work: Path, peer: str) -> Iterator[tuple[str, str, Stats | None]]:
    """Yields (store kind, engine URL, storage probe) for one of ``PEERS``."""
    if peer == "bare":
        yield "bare", "", None
        return
    if peer == "pg":
        pg = PostgresEngine(work / "engine-pg")
        with pg:
            yield "pg", pg.dsn(), _pg_stats(pg)
        return
    if peer not in ("redis-always", "redis-everysec"):
        raise ValueError(f"unknown peer {peer!r} (known: {', '.join(PEERS)})")
    engine = RedisEngine(work / f"engine-{peer}", appendfsync=peer.removeprefix("redis-"))
    with engine:
        yield "redis", engine.url, _redis_stats(engine.url, _used_memory(engine.url))
