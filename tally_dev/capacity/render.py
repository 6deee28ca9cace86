"""A capacity plan as plain text (what design.md pastes) or as JSON."""

from __future__ import annotations

import textwrap
from dataclasses import asdict
from typing import Any

from tally_dev.capacity.model import Figure, Plan

LABELS = {"processes": "processes", "hot_counter_kb_per_process": "hot counts kB/process",
          "primaries": "primaries", "write_iops_per_primary": "write IOPS/primary (at most)",
          "read_iops_per_primary": "read IOPS/primary", "wal_mb_per_s_per_primary": "WAL MB/s/primary",
          "disk_tb_per_server": "TB/server", "storage_tb": "TB stored",
          "write_mb_per_s": "MB/s written", "memory_gb": "GB memory", "shards": "shards"}


def _n(x: float) -> str:
    """A count: whole above 100, else three significant digits."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _bytes(x: float) -> str:
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= size:
            return f"{x / size:,.3g} {unit}" if x / size < 1000 else f"{x / size:,.0f} {unit}"
    return f"{x:,.0f} B"


def _rate(bps: float) -> str:
    return f"{_bytes(bps)}/s ({bps * 8 / 1e9:,.3g} Gbit/s)"


def text(plan: Plan) -> str:
    ld, t, st, bw = plan.load, plan.traffic, plan.storage, plan.bandwidth
    per_day = ("given" if ld.likes_per_day is not None
               else f"{_n(ld.daily_users)} users x {_n(ld.likes_per_user_per_day)}")
    lines = [
        "Load",
        f"  items                    {_n(ld.items)}",
        f"  likes+unlikes per day    {_n(t.likes_per_day)}  ({per_day})",
        f"  likes/s average, peak    {_n(t.likes_avg_per_s)}, {_n(t.likes_peak_per_s)}"
        f"  (peak factor {ld.peak_factor:g})",
        f"  count reads/s peak, avg  {_n(t.reads_peak_per_s)}, {_n(t.reads_avg_per_s)}"
        f"  ({_n(t.feeds_peak_per_s)} requests/s of {ld.feed_size} items, with has-liked)",
        f"  read:write at peak       {t.read_write_ratio:.3g} count reads per like",
        f"  regions                  {ld.regions}, each sized for {t.region_share:.3g} of the "
        f"world's reads and writes",
        f"  replication              {ld.replication} copies per region (PostgreSQL, "
        f"JetStream), Redis 1+{ld.redis_replicas}; CPU at {ld.utilisation:.0%} at peak",
        "",
        "Per-core throughputs (one core of the role; one like, or one feed read, per request)",
    ]
    r = plan.rates
    sources: list[str] = []

    def cite(fig: Figure) -> str:
        if fig.source not in sources:
            sources.append(fig.source)
        return f"[{sources.index(fig.source) + 1}] {fig.run}".rstrip()

    for role, fig in r.likes_per_core.items():
        lines.append(f"  {role:13} {_n(fig.value):>9} likes/s  {cite(fig)}")
    for role, fig in r.feeds_per_core.items():
        lines.append(f"  {role:13} {_n(fig.value):>9} feeds/s  {cite(fig)} (feeds of {r.feed_size})")
    for label, fig in (("like record", r.pg_bytes_per_like), ("count row", r.pg_bytes_per_count),
                       ("WAL per like", r.pg_wal_bytes_per_like), ("event", r.event_bytes),
                       ("Redis count", r.redis_bytes_per_counter),
                       ("API hot count", r.hot_counter_bytes)):
        lines.append(f"  {label:13} {fig.value:>9,.0f} B        {cite(fig)}")
    lines += [f"  [{i}] {src}" for i, src in enumerate(sources, 1)]
    lines += ["", f"Fleet per region (x{ld.regions} regions for the total; disks for a year's growth)",
              f"  {'role':11} {'cores':>10} {'units':>8}  unit / detail"]
    for fleet in plan.roles:
        lines.append(f"  {fleet.name:11} {_n(fleet.cores):>10} {fleet.units:>8,}  {fleet.unit}")
        detail = ", ".join(f"{LABELS.get(k, k)} {_n(v)}" for k, v in fleet.detail.items())
        lines += textwrap.wrap(detail, 100, initial_indent=" " * 35, subsequent_indent=" " * 35)
    total = sum(f.cores for f in plan.roles) * ld.regions
    lines += [f"  all roles, all regions: {_n(total)} cores", "",
              "Storage",
              f"  like records             {_bytes(st['like_records_per_day'])}/day, "
              f"{_bytes(st['like_records_per_year'])}/year (one copy); "
              f"{_bytes(st['like_records_per_year_all_copies'])}/year in all copies",
              f"  count rows               {_bytes(st['counts_table_per_region'])} per copy "
              "(every region holds every count)",
              f"  PostgreSQL WAL           {_bytes(st['wal_per_day'])}/day written in each region "
              "(shipped to its standbys, then recycled)",
              f"  event log                {_bytes(st['event_log_retained'])} per copy for "
              f"{ld.retention_days:g} days, {_bytes(st['event_log_retained_all_copies'])} "
              "in all copies",
              f"  Redis                    {_n(st['redis_counters'])} counts "
              f"({ld.cached_share:.0%} of items): {_bytes(st['redis_per_region'])} per region "
              "with replicas",
              "",
              "Bandwidth between regions (change events; like records are rebuilt from them)",
              f"  peak, out of each region {_rate(bw['peak_out_per_region'])}",
              f"  peak, all regions        {_rate(bw['peak_total'])}",
              f"  average, all regions     {_rate(bw['avg_total'])}"]
    lines += [f"WARNING: {w}" for w in plan.warnings]
    return "\n".join(lines) + "\n"


def as_dict(plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = asdict(plan)
    out["totals"] = {"cores_all_regions": sum(r.cores for r in plan.roles) * plan.load.regions}
    return out
