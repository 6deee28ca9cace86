"""The capacity arithmetic: a load and per-core costs in, a fleet, storage and bandwidth out.

No I/O and no product code: every figure it needs arrives in ``Load`` (what the traffic is) and
``Rates`` (what one core of each role serves and what a record weighs, each with its source), so
the plan can be checked by hand (tests/capacity/test_model.py does, for one small input).

The shape modelled is the cluster (docs/scale-out.md) replicated per region as issue 14 plans it:
every region runs the whole stack, holds every count and a copy of every like record, and applies
every region's events; a user's writes go to their home region. So, per region:

* API and relay work is the region's share of the traffic. With R > 1 regions each is sized for
  1 / (R - 1) of the world's traffic, so the survivors carry a lost region's users; R = 1 is sized
  for all of it.
* PostgreSQL, NATS, aggregator and Redis-write work follows every like in the world (each region
  applies every event), and PostgreSQL's cost per like is taken whole in every region: an upper
  bound, since a replicated like is applied in batches, not one transaction per like.
* CPU roles run at ``utilisation`` of their cores at peak, so the p99 holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

DAY_S = 86_400.0
YEAR_DAYS = 365.0
PAGE_BYTES = 8192  # PostgreSQL's page

# Roles whose CPU the benchmark measures (tally_dev/bench/cpu.py names them so).
API, RELAY, AGGREGATOR, POSTGRES, NATS, REDIS = "api", "relay", "aggregator", "postgres", "nats", "redis"
ROLES = (API, RELAY, AGGREGATOR, POSTGRES, NATS, REDIS)
# Work done once per region for its own users (sized by its share) vs for every like in the world.
HOME_ROLES = frozenset({API, RELAY})


_MAY_BE_ZERO = frozenset({"redis_replicas", "pg_cache_miss"})
_SHARES = frozenset({"cached_share", "new_record_share", "pg_cache_miss", "utilisation"})
_WHOLE = frozenset({"feed_size", "replication", "regions", "redis_replicas", "pg_cores_per_server",
                    "nats_cores_per_node", "api_cores_per_server", "log_partitions", "hot_top_k"})


class CapacityError(ValueError):
    """An input the model cannot plan for; the message names it."""


@dataclass(frozen=True)
class Figure:
    value: float
    source: str  # the document or file, and which run of it
    run: str = ""  # the measurement within it


@dataclass(frozen=True)
class Load:
    """The traffic and the deployment's shape. Defaults: the requirements' scale (see design.md)."""

    items: float = 50e9  # "tens of billions of items"
    daily_users: float = 500e6  # "hundreds of millions of active users"
    likes_per_user_per_day: float = 50.0  # likes and unlikes
    likes_per_day: float | None = None  # given: overrides daily_users x likes_per_user_per_day
    peak_factor: float = 7.0  # peak second / average second
    reads_per_s: float = 20e6  # peak count reads (one item's count each): "tens of millions"
    feed_size: int = 50  # items per read request; the request also asks has-liked for them
    replication: int = 3  # copies of each durable store (PostgreSQL, JetStream) in a region
    redis_replicas: int = 1  # Redis is a cache: one replica for failover
    regions: int = 3
    retention_days: float = 7.0  # the event log's retention (settings.log_max_age_s)
    cached_share: float = 0.05  # share of items whose count is in Redis (read within its TTL)
    new_record_share: float = 0.8  # toggles that create a like record (the rest flip one back)
    pg_cache_miss: float = 0.1  # has-liked seeks that go to disk
    utilisation: float = 0.6  # of each CPU role's cores, at peak
    pg_cores_per_server: int = 32
    pg_disk_tb_per_server: float = 8.0  # usable
    nats_cores_per_node: int = 16
    nats_disk_tb_per_node: float = 4.0
    redis_gb_per_node: float = 64.0
    api_cores_per_server: int = 32
    log_partitions: int = 16  # settings.log_partitions: aggregators beyond it have no work
    hot_top_k: int = 32  # the hot-item sketch's k (tally/core/hotkeys.py): counts an API keeps

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) \
                    or not math.isfinite(value):
                raise CapacityError(f"{f.name} must be a finite number, got {value!r}")
            if f.name in _MAY_BE_ZERO:
                if value < 0:
                    raise CapacityError(f"{f.name} must be >= 0, got {value:g}")
            elif value <= 0:
                raise CapacityError(f"{f.name} must be > 0, got {value:g}")
            if f.name in _SHARES and value > 1:
                raise CapacityError(f"{f.name} is a share: at most 1, got {value:g}")
            if f.name in _WHOLE and value != int(value):
                raise CapacityError(f"{f.name} must be a whole number, got {value:g}")
        if self.peak_factor < 1:
            raise CapacityError(f"peak_factor is peak / average: at least 1, got {self.peak_factor:g}")

    def scaled(self, k: float) -> Load:
        """The same deployment under k times the traffic (and k times the items)."""
        from dataclasses import replace

        return replace(self, items=self.items * k, daily_users=self.daily_users * k,
                       likes_per_day=None if self.likes_per_day is None else self.likes_per_day * k,
                       reads_per_s=self.reads_per_s * k)


@dataclass(frozen=True)
class Rates:
    """What one core of each role serves, per like (one like per request) and per feed read
    (``feed_size`` counts and has-liked), and what each record weighs."""

    likes_per_core: dict[str, Figure]  # role -> like requests per second one core serves
    feeds_per_core: dict[str, Figure]  # role -> feed reads per second one core serves (API, PG, Redis)
    pg_bytes_per_like: Figure  # a like record with its indexes, on disk
    pg_bytes_per_count: Figure  # an item's count row with its index, on disk
    pg_wal_bytes_per_like: Figure
    event_bytes: Figure  # one change event in the event log
    redis_bytes_per_counter: Figure
    hot_counter_bytes: Figure  # one count in an API process's memory
    feed_size: int  # the feed the feed figures were measured with

    def __post_init__(self) -> None:
        for role in ROLES:
            if role not in self.likes_per_core:
                raise CapacityError(f"no per-core like throughput for role {role!r}")
        for name, fig in self.all_figures().items():
            if not fig.value > 0 or math.isinf(fig.value):
                raise CapacityError(f"{name} must be a positive number, got {fig.value!r} "
                                    f"({fig.source})")

    def all_figures(self) -> dict[str, Figure]:
        out = {f"{r} likes/s per core": f for r, f in self.likes_per_core.items()}
        out.update({f"{r} feeds/s per core": f for r, f in self.feeds_per_core.items()})
        for name in ("pg_bytes_per_like", "pg_bytes_per_count", "pg_wal_bytes_per_like", "event_bytes",
                     "redis_bytes_per_counter", "hot_counter_bytes"):
            out[name] = getattr(self, name)
        return out


@dataclass(frozen=True)
class Traffic:
    likes_per_day: float
    likes_avg_per_s: float
    likes_peak_per_s: float
    reads_peak_per_s: float
    reads_avg_per_s: float
    feeds_peak_per_s: float
    read_write_ratio: float  # count reads per like, at peak
    region_share: float  # of the world's traffic one region is sized for


@dataclass(frozen=True)
class Role:
    """One role's fleet in one region. ``cores`` is exact (scales with the load); the counts of
    machines are whole numbers for that region."""

    name: str
    cores: float
    units: int  # servers, nodes or processes, per region, replicas included
    unit: str
    detail: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    load: Load
    rates: Rates
    traffic: Traffic
    roles: list[Role]  # per region
    storage: dict[str, float]  # bytes
    bandwidth: dict[str, float]  # bytes per second
    warnings: list[str]


def traffic(load: Load) -> Traffic:
    per_day = (load.likes_per_day if load.likes_per_day is not None
               else load.daily_users * load.likes_per_user_per_day)
    avg = per_day / DAY_S
    peak = avg * load.peak_factor
    share = 1.0 if load.regions == 1 else 1.0 / (load.regions - 1)
    return Traffic(likes_per_day=per_day, likes_avg_per_s=avg, likes_peak_per_s=peak,
                   reads_peak_per_s=load.reads_per_s,
                   reads_avg_per_s=load.reads_per_s / load.peak_factor,
                   feeds_peak_per_s=load.reads_per_s / load.feed_size,
                   read_write_ratio=load.reads_per_s / peak, region_share=min(share, 1.0))


def cores(load: Load, rates: Rates, t: Traffic) -> dict[str, float]:
    """Cores per region and role at peak, at the target utilisation."""
    # The feed figures were measured with rates.feed_size items: a larger feed costs in proportion.
    feeds = t.feeds_peak_per_s * t.region_share * load.feed_size / rates.feed_size
    out = {}
    for role in ROLES:
        likes = t.likes_peak_per_s * (t.region_share if role in HOME_ROLES else 1.0)
        busy = likes / rates.likes_per_core[role].value
        if role in rates.feeds_per_core:
            busy += feeds / rates.feeds_per_core[role].value
        out[role] = busy / load.utilisation
    return out


def _ceil(x: float) -> int:
    return max(1, math.ceil(x - 1e-9))


def storage(load: Load, rates: Rates, t: Traffic) -> dict[str, float]:
    """Bytes: one copy, then every copy (replication x regions)."""
    records_day = t.likes_per_day * load.new_record_share * rates.pg_bytes_per_like.value
    log = t.likes_per_day * rates.event_bytes.value * load.retention_days
    copies = load.replication * load.regions
    cached = load.items * load.cached_share
    return {
        "like_records_per_day": records_day,
        "like_records_per_year": records_day * YEAR_DAYS,
        "like_records_per_year_all_copies": records_day * YEAR_DAYS * copies,
        "wal_per_day": t.likes_per_day * rates.pg_wal_bytes_per_like.value,
        "event_log_retained": log,
        "event_log_retained_all_copies": log * copies,
        "redis_counters": cached,
        "redis_per_region": cached * rates.redis_bytes_per_counter.value * (1 + load.redis_replicas),
        "counts_table_per_region": load.items * rates.pg_bytes_per_count.value,
    }


def bandwidth(load: Load, rates: Rates, t: Traffic) -> dict[str, float]:
    """Bytes/s leaving each region for the others, and in all: every event goes from its home
    region to each other region once (JetStream sourcing); like records are rebuilt from it."""
    per_region_out = t.likes_peak_per_s / load.regions * rates.event_bytes.value * (load.regions - 1)
    return {"peak_out_per_region": per_region_out,
            "peak_total": per_region_out * load.regions,
            "avg_total": per_region_out * load.regions / load.peak_factor}


def fleet(load: Load, rates: Rates, t: Traffic, c: dict[str, float],
          st: dict[str, float]) -> tuple[list[Role], list[str]]:
    warnings: list[str] = []
    # Every region holds every like record (after a year's growth) and every count.
    year_records = st["like_records_per_year"] + st["counts_table_per_region"]
    pg_primaries = max(_ceil(c[POSTGRES] / load.pg_cores_per_server),
                       _ceil(year_records / (load.pg_disk_tb_per_server * 1e12)))
    likes_per_primary = t.likes_peak_per_s / pg_primaries
    seeks = t.feeds_peak_per_s * t.region_share * load.feed_size / pg_primaries
    pg = Role(POSTGRES, c[POSTGRES], pg_primaries * load.replication, "servers", {
        "primaries": pg_primaries,
        "write_iops_per_primary": likes_per_primary,  # upper bound: one page write per like
        "read_iops_per_primary": seeks * load.pg_cache_miss,
        "wal_mb_per_s_per_primary": likes_per_primary * rates.pg_wal_bytes_per_like.value / 1e6,
        "disk_tb_per_server": year_records / pg_primaries / 1e12})
    log_bytes = st["event_log_retained"]
    nats_nodes = max(load.replication, _ceil(c[NATS] / load.nats_cores_per_node),
                     _ceil(log_bytes * load.replication / (load.nats_disk_tb_per_node * 1e12)))
    nats = Role(NATS, c[NATS], nats_nodes, "JetStream nodes", {
        "storage_tb": log_bytes * load.replication / 1e12,
        "write_mb_per_s": t.likes_peak_per_s * rates.event_bytes.value * load.replication / 1e6})
    redis_gb = st["redis_per_region"] / 1e9
    shards = max(_ceil(c[REDIS]), _ceil(redis_gb / (1 + load.redis_replicas) / load.redis_gb_per_node))
    redis = Role(REDIS, c[REDIS], shards * (1 + load.redis_replicas), "nodes", {
        "memory_gb": redis_gb, "shards": shards})
    api = Role(API, c[API], _ceil(c[API] / load.api_cores_per_server), "servers", {
        "processes": _ceil(c[API]),
        "hot_counter_kb_per_process": load.hot_top_k * rates.hot_counter_bytes.value / 1e3})
    relay = Role(RELAY, c[RELAY], _ceil(c[RELAY]), "processes")
    agg = Role(AGGREGATOR, c[AGGREGATOR], _ceil(c[AGGREGATOR]), "processes")
    if agg.units > load.log_partitions:
        warnings.append(f"{agg.units} aggregator processes need at least as many event-log "
                        f"partitions; log_partitions is {load.log_partitions} and fixed for the "
                        "life of a stream: create the stream with more")
    if pg_primaries > 4096:
        warnings.append(f"{pg_primaries} PostgreSQL primaries exceed the 4,096 logical shards")
    return [api, pg, nats, redis, relay, agg], warnings


def plan(load: Load, rates: Rates) -> Plan:
    t = traffic(load)
    c = cores(load, rates, t)
    st = storage(load, rates, t)
    roles, warnings = fleet(load, rates, t, c, st)
    return Plan(load, rates, t, roles, st, bandwidth(load, rates, t), warnings)
