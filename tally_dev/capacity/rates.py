"""Per-core throughputs and record sizes: built in (measured here), or from a benchmark result.

The benchmark suite (``make bench``, tally_dev/bench/suite.py) runs the cluster at its smallest
(one API, relay and aggregator, one PostgreSQL, NATS and Redis). It keeps each role's idle CPU per
second, and for each closed-loop run the CPU seconds every role spent (``cpu_s``, over
``cpu_wall_s``: from the load's start until the event log caught up) and the WAL PostgreSQL
wrote; after the runs, the bytes per like record and per count row in PostgreSQL and per cached
count in Redis. What one core of a role serves is then

    operations of the run / (CPU seconds of the role - its idle CPU over the same wall time),

where the operations are the run's throughput times its load time (warm-up included: the CPU
counts it too). Sizing from CPU rather than from the cluster's throughput is what makes a two-core
machine shared by six processes usable: it says how the work splits between the roles. No I/O
here: ``from_result`` takes the parsed JSON.
"""

from __future__ import annotations

from typing import Any

from tally_dev.capacity.model import (
    API,
    POSTGRES,
    REDIS,
    ROLES,
    CapacityError,
    Figure,
    Rates,
)

FEED_ROLES = (API, POSTGRES, REDIS)  # the relay, aggregator and NATS do nothing for a read
# Roles whose work is per event, in batches: priced from the bulk run when there is one, where
# their batches are as full as at scale (one like per request leaves them nearly empty here).
EVENT_ROLES = ("relay", "aggregator", "nats", REDIS)

# encode_run (tally/store/jetstream/eventlog.py) of a run of 500 likes with 11-digit post ids and
# 13-digit user ids: 81 bytes each; tests/capacity/test_cli.py holds this to the encoder.
EVENT_BYTES = Figure(81.0, "tally.store.jetstream.eventlog.encode_run (tests/capacity/test_cli.py)",
                     "500 likes per message")
HOT_COUNTER_BYTES = Figure(330.0, "docs/performance.md, Memory (every suite of sessions 9 and 10)",
                           "tracemalloc around Tally's LRU")

_BUILTIN_RUN = ("docs/performance.md, 'CPU per role in the cluster', run 2 "
                "(`tally bench suite --cluster-only`, commit 87be394)")


def builtin() -> Rates:
    """The figures measured on this machine, each naming where performance.md reports it."""
    src = _BUILTIN_RUN
    likes = {API: (3_172, "uniform"), "relay": (139_000, "bulk"), "aggregator": (33_800, "bulk"),
             POSTGRES: (1_630, "uniform"), "nats": (211_000, "bulk"), REDIS: (110_000, "bulk")}
    feeds = {API: 370.8, POSTGRES: 1_012, REDIS: 3_059}
    return Rates(
        likes_per_core={r: Figure(v, src, f"cluster/{run}") for r, (v, run) in likes.items()},
        feeds_per_core={r: Figure(v, src, "cluster/feed") for r, v in feeds.items()},
        pg_bytes_per_like=Figure(315.9, src, "toggles table"),
        pg_bytes_per_count=Figure(113.9, src, "counts table"),
        pg_wal_bytes_per_like=Figure(1_213, src, "cluster/uniform"),
        event_bytes=EVENT_BYTES,
        redis_bytes_per_counter=Figure(161.6, src, "Redis used_memory over keys"),
        hot_counter_bytes=HOT_COUNTER_BYTES,
        feed_size=50)


def _find(result: dict[str, Any], preset: str) -> dict[str, Any] | None:
    """The last closed-loop cluster run of a workload that carries per-role CPU."""
    runs = [r for r in result.get("runs", []) if isinstance(r, dict)
            and r.get("target") == "cluster" and r.get("preset") == preset
            and r.get("mode") == "closed" and isinstance(r.get("cpu_s"), dict)]
    return runs[-1] if runs else None


def _run(result: dict[str, Any], preset: str, name: str) -> dict[str, Any]:
    run = _find(result, preset)
    if run is None:
        raise CapacityError(f"{name}: no closed-loop cluster/{preset} run with per-role CPU "
                            "(cpu_s); write one with `make bench` (tally bench suite)")
    return run


def _ops(run: dict[str, Any], name: str) -> float:
    """Likes (or feeds) the run completed, warm-up included; a bulk request carries many."""
    try:
        spec = run["spec"]
        per_request = int(spec["params"]["bulk_size"]) if run.get("preset") == "bulk" else 1
        ops = (float(run["throughput_per_s"]) * per_request
               * (float(spec["warmup_s"]) + float(spec["duration_s"])))
    except (KeyError, TypeError, ValueError) as exc:
        raise CapacityError(f"{name}: run {run.get('name')!r} lacks {exc}") from exc
    if ops <= 0:
        raise CapacityError(f"{name}: run {run.get('name')!r} completed no operations")
    return ops


def _per_core(run: dict[str, Any], roles: tuple[str, ...], idle: dict[str, Any], name: str,
              what: str, where: str) -> dict[str, Figure]:
    """Operations over the CPU each role spent on them: its CPU during the run less what it
    spends idle (polling, leases) over the same wall time, which a loaded process does not add."""
    ops = _ops(run, name)
    wall = run.get("cpu_wall_s", 0.0)
    out = {}
    for role in roles:
        cpu = run["cpu_s"].get(role)
        if not isinstance(cpu, (int, float)) or cpu <= 0:
            raise CapacityError(f"{name}: run {run.get('name')!r} has no CPU time for role {role!r}")
        rate = idle.get(role, 0.0)
        net = cpu - (rate * wall if isinstance(rate, (int, float)) and isinstance(wall, (int, float))
                     else 0.0)
        if net <= 0:
            raise CapacityError(f"{name}: run {run.get('name')!r}: role {role!r} spent no more "
                                "CPU than idle; measure a longer or heavier run")
        out[role] = Figure(ops / net, where, f"{run.get('name')}: {ops:,.0f} {what} / "
                                             f"{net:.2f} CPU s")
    return out


def _size(result: dict[str, Any], path: tuple[str, ...], name: str, where: str) -> Figure:
    node: Any = result
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    value = node.get("bytes_per_record") if isinstance(node, dict) else None
    if not isinstance(value, (int, float)) or value <= 0:
        raise CapacityError(f"{name}: no {'.'.join(path)}.bytes_per_record (write it with "
                            "`make bench`)")
    return Figure(float(value), where, f"{'.'.join(path)}: {node.get('records', 0):,.0f} records")


def from_result(result: Any, name: str) -> Rates:
    """Rates from the parsed result.json of ``tally bench suite``; ``name`` is for messages."""
    if not isinstance(result, dict):
        raise CapacityError(f"{name}: not a benchmark result (a JSON object with runs)")
    machine = result.get("machine")
    machine = machine if isinstance(machine, dict) else {}
    where = f"{name} (commit {machine.get('commit') or '?'}, {machine.get('cores', '?')} cores)"
    uniform = _run(result, "uniform", name)
    feed = _run(result, "feed", name)
    bulk = _find(result, "bulk")
    wal = uniform.get("pg_wal_bytes")
    if not isinstance(wal, (int, float)) or wal <= 0:
        raise CapacityError(f"{name}: run {uniform.get('name')!r} has no pg_wal_bytes")
    feed_size = feed.get("spec", {}).get("params", {}).get("feed_size", 50)
    if not isinstance(feed_size, int) or feed_size <= 0:
        raise CapacityError(f"{name}: run {feed.get('name')!r} has a bad feed_size {feed_size!r}")
    idle = result.get("cluster_idle_cpu_per_s")
    idle = idle if isinstance(idle, dict) else {}
    return Rates(
        likes_per_core={**_per_core(uniform, ROLES, idle, name, "likes", where),
                        **(_per_core(bulk, EVENT_ROLES, idle, name, "likes", where) if bulk else {})},
        feeds_per_core=_per_core(feed, FEED_ROLES, idle, name, "feeds", where),
        pg_bytes_per_like=_size(result, ("cluster_tables", "toggles"), name, where),
        pg_bytes_per_count=_size(result, ("cluster_tables", "counts"), name, where),
        pg_wal_bytes_per_like=Figure(wal / _ops(uniform, name), where,
                                     f"{uniform.get('name')}: {wal:,.0f} WAL bytes"),
        event_bytes=EVENT_BYTES,
        redis_bytes_per_counter=_size(result, ("cluster_redis",), name, where),
        hot_counter_bytes=HOT_COUNTER_BYTES,
        feed_size=feed_size)
