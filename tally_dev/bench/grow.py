"""Cost as the data grows: Tally embedded with N likes already stored, against an empty database.

``tally bench grow --sizes 0,1000000,10000000`` loads each size straight into a fresh database
(the like records and their counts, as if aggregated and the log trimmed: far faster than through
the API), starts ``tally serve`` on it, and measures uniform likes and the feed at their closed-
loop maxima with the server's CPU per operation, plus bytes per like on disk. Likes go to
Zipf-drawn items (s=1 over 10 million), as the feed reads them, by users of their own.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from tally.store.sqlite.schema import connect, counts_path, migrate
from tally_dev.bench.workloads import Params

if TYPE_CHECKING:
    from tally_dev.bench.suite import Suite

INSERT = "INSERT INTO toggles VALUES ('like', ?, ?, 1, 1, ?)"
PRESETS = ("uniform", "feed")
WARM_S = 30.0  # unmeasured load between a server's two measurements, half likes, half feeds


def item_counts(likes: int, params: Params, seed: int) -> list[tuple[str, int]]:
    """How many of ``likes`` Zipf-drawn likes each item gets, in the key's order: one
    multinomial draw over the items with the law ``Zipf.draw`` samples (item k with
    probability log((k+1)/k) / log(n+1) at s=1), the same as ``likes`` draws one by one."""
    import numpy as np

    n = params.items
    k = np.arange(1, n + 1, dtype=np.float64)
    if params.zipf_s == 1.0:
        p = np.log1p(1.0 / k)
    else:
        p = np.abs((k + 1) ** (1 - params.zipf_s) - k ** (1 - params.zipf_s))
    counts = np.random.default_rng(seed).multinomial(likes, p / p.sum())
    liked = np.flatnonzero(counts)
    return sorted((f"post:{i + 1}", int(counts[i])) for i in liked)


def preload(db: Path, likes: int, params: Params = Params(), seed: int = 1,
            chunk: int = 500_000, progress: Callable[[int], None] | None = None) -> float:
    """Loads ``likes`` like records into a new database at ``db``; returns the seconds it took.

    Rows go in in primary-key order (item, then user), so each insert appends to the B-tree's
    rightmost page: random inserts into a file far larger than memory would read and rewrite a
    page per like (10 million took 13 minutes that way, 100 million would not finish in hours)."""
    started = time.monotonic()
    db.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(db, "OFF")
    migrate(conn)
    per_item = item_counts(likes, params, seed)
    now, user = time.time(), 0
    rows: list[tuple[str, str, float]] = []
    done = 0

    def flush() -> None:
        nonlocal rows, done
        conn.execute("BEGIN")
        conn.executemany(INSERT, rows)
        conn.execute("COMMIT")
        done += len(rows)
        rows = []
        if progress is not None:
            progress(done)

    for item, n in per_item:
        users = [f"g{u}" for u in range(user, user + n)]
        user += n
        if n > 1:
            users.sort()
        rows.extend((item, u, now) for u in users)
        if len(rows) >= chunk:
            flush()
    flush()
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO counts.counts VALUES ('like', ?, ?)", per_item)
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA counts.wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.monotonic() - started


def disk_bytes(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, counts_path(db)) if p.exists())


def run(sizes: list[int], out: Path, duration_s: float = 6.0, show_progress: bool = True,
        keep: Path | None = None, warm_s: float = WARM_S) -> dict[str, Any]:
    """One server per size, each measured on uniform likes and the feed; results in ``out``.
    ``keep``: a directory where each size's loaded database stays (``keep/<size>``) and is
    copied from on later runs instead of loaded again (100M likes take minutes to load).
    ``warm_s``: after the first measurement, this many seconds of unmeasured likes and feeds,
    then both measured again (0: only the first)."""
    from tally_dev.bench.suite import Suite, SuitePlan

    work = Path(tempfile.mkdtemp(prefix="tally-grow-"))
    suite = Suite(SuitePlan(duration_s=duration_s, rounds=1), work, show_progress)
    rows: list[dict[str, Any]] = []
    try:
        _measure_sizes(sizes, work, suite, rows, show_progress, keep, warm_s)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # 0.5 GB per 10 million likes
    out.mkdir(parents=True, exist_ok=True)
    result = {"rows": rows, "runs": suite.runs}
    (out / "grow.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    (out / "grow.md").write_text(markdown(rows))
    return result


def _loaded(db: Path, size: int, keep: Path | None, show_progress: bool) -> float:
    """``size`` likes in a new database at ``db``, loaded or copied from ``keep``; then every
    dirty page written out (``sync``), so the run does not measure the kernel's writeback of
    the load: gigabytes of it delayed every fsync of the first runs at 100M likes. Returns the
    seconds the load took (0 when copied)."""
    progress = load_progress(size) if show_progress else None
    if keep is None:
        seconds = preload(db, size, progress=progress)
    else:
        kept = keep / str(size) / "tally.db"
        seconds = 0.0
        if not kept.exists():
            seconds = preload(kept, size, progress=progress)
        db.parent.mkdir(parents=True, exist_ok=True)
        for src in (kept, counts_path(kept)):
            shutil.copyfile(src, db.parent / src.name)
    os.sync()
    return seconds


def _measure_sizes(sizes: list[int], work: Path, suite: Suite, rows: list[dict[str, Any]],
                   show_progress: bool, keep: Path | None = None, warm_s: float = 0.0) -> None:
    """Each size measured in its server's first seconds, then (``warm_s`` > 0) again after
    that much more load. A server just started on a large file pays for pages it has not yet
    touched: faults into its memory map, reads into its connections' page caches; a server in
    service has paid them. Both are reported: the first is what a restart costs, the second
    what the store's size costs."""
    from tally_dev.bench import targets

    for size in sizes:
        name = f"grow-{size}"
        db = work / name / "data" / "tally.db"
        load_s = _loaded(db, size, keep, show_progress) if size else 0.0
        stored = disk_bytes(db)
        with targets.tally_server(work, name) as server:
            if server.proc is not None:
                suite.pids["tally"] = server.proc.pid
            row: dict[str, Any] = {"likes": size, "load_s": round(load_s, 1), "bytes": stored,
                                   "bytes_per_like": round(stored / size, 1) if size else None}
            row.update(_measured(suite, server.port))
            if warm_s > 0:
                for preset in PRESETS:  # unmeasured, but kept in the runs, named as warm-up
                    suite.measure("tally", server.port, preset, duration_s=warm_s / 2,
                                  name=f"tally/{preset} warm-up {warm_s / 2:g} s")
                row["warm"] = _measured(suite, server.port, " warm")
        rows.append(row)
        if show_progress:
            print(f"  {size:>12,} likes: {row}", file=sys.stderr)


def _measured(suite: Suite, port: int, label: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for preset in PRESETS:
        r = suite.measure("tally", port, preset, name=f"tally/{preset}{label}")
        out[preset] = {"per_s": round(r["throughput_per_s"], 1),
                       "p99_ms": r["latency"].get("p99_ms"),
                       "cpu_us_per_op": r.get("server_cpu_us_per_op")}
    return out


def load_progress(size: int) -> Callable[[int], None]:
    started, step = time.monotonic(), max(size // 10, 1)
    shown = [0]

    def show(done: int) -> None:
        if done - shown[0] >= step or done == size:
            shown[0] = done
            print(f"  loading: {done:,} of {size:,} likes, {time.monotonic() - started:.0f} s",
                  file=sys.stderr)

    return show


def vs_empty(measured: dict[str, Any], empty: dict[str, Any] | None) -> tuple[str, str]:
    """What the targets compare: a size's like rate as a share of the empty store's, and its
    feed p99 as a multiple of the empty store's (both blank without an empty row)."""
    if empty is None or measured is empty:
        return "", ""
    u, f = measured["uniform"], measured["feed"]
    rate = (f" ({u['per_s'] / empty['uniform']['per_s']:.0%} of empty)"
            if empty["uniform"]["per_s"] else "")
    p99 = (f" ({f['p99_ms'] / empty['feed']['p99_ms']:.1f}x empty)"
           if empty["feed"]["p99_ms"] else "")
    return rate, p99


def markdown(rows: list[dict[str, Any]]) -> str:
    """A line per size and measurement (the server's first seconds, then after the warm-up),
    each compared with the empty database's of the same measurement."""
    out = ["| likes stored | measured | bytes/like on disk | uniform likes/s (p99 ms) | "
           "API / writer CPU us per like | feed req/s (p99 ms) | API CPU us per feed |",
           "|---:|---|---:|---:|---:|---:|---:|"]
    phases = [("first seconds", "")] + ([("after warm-up", "warm")]
                                        if any("warm" in r for r in rows) else [])
    for title, key in phases:
        measured = [(r, r.get(key) if key else r) for r in rows]
        empty = measured[0][1] if rows and rows[0]["likes"] == 0 else None
        for r, m in measured:
            if m is None:
                continue
            u, f = m["uniform"], m["feed"]
            cu, cf = u["cpu_us_per_op"] or {}, f["cpu_us_per_op"] or {}
            rel_u, rel_f = vs_empty(m, empty)
            out.append(f"| {r['likes']:,} | {title} | {r['bytes_per_like'] or '-'} | "
                       f"{u['per_s']:,.0f} ({u['p99_ms']:.1f}){rel_u} | "
                       f"{cu.get('server', 0):.0f} / {cu.get('children', 0):.0f} | "
                       f"{f['per_s']:,.0f} ({f['p99_ms']:.1f}){rel_f} | {cf.get('server', 0):.0f} |")
    return "\n".join(out) + "\n"
