"""Memory and storage cost per counter and per like record, measured, then projected.

Bytes per cached hot counter: tracemalloc around filling Tally's own LRU with realistic keys and
counts (the key tuple, its item string and the entry are all counted). Bytes per stored like
record: the database's size on disk divided by the like records it holds, for SQLite here and
for the peers where they ran.
"""

from __future__ import annotations

import gc
import sqlite3
import tracemalloc
from pathlib import Path
from typing import Any

from tally.core.lru import LRU
from tally.core.model import CountKey
from tally.store.sqlite.schema import counts_path

ITEMS_PROJECTED = 50_000_000_000
LIKES_PROJECTED = 1_000_000_000_000


def bytes_per_cached_counter(n: int = 100_000) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cache: LRU[CountKey, int] = LRU(n, 30.0)
        for i in range(n):
            cache.put(("like", f"post:{1_000_000_000 + i}"), 1_000 + i)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del cache
    return (after - before) / n


def sqlite_bytes_per_like(db: Path) -> dict[str, float]:
    """File sizes (the counts file and every shard of the like records, with their WALs) over
    live like records; every other table counts against it."""
    shards = [db, *sorted(db.parent.glob(f"{db.stem}-likes*{db.suffix}"))]
    likes = 0
    for path in shards:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            likes += conn.execute("SELECT count(*) FROM toggles WHERE state=1").fetchone()[0]
        finally:
            conn.close()
    files = [f for path in (*shards, counts_path(db))
             for f in (path, path.with_name(path.name + "-wal"))]
    size = sum(f.stat().st_size for f in files if f.exists())
    return {"records": float(likes), "bytes": float(size),
            "bytes_per_record": size / likes if likes else 0.0}


def projection(per_counter: float, per_like: dict[str, float]) -> dict[str, Any]:
    """What 50 billion items and 1 trillion like records would take at the measured rates."""
    out: dict[str, Any] = {
        "bytes_per_cached_counter": round(per_counter, 1),
        "cache_all_items_tb": per_counter * ITEMS_PROJECTED / 1e12,
    }
    for name, bpl in per_like.items():
        out[f"{name}_bytes_per_like"] = round(bpl, 1)
        out[f"{name}_trillion_likes_tb"] = bpl * LIKES_PROJECTED / 1e12
    return out
