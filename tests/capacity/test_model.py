"""The capacity arithmetic: one small plan worked by hand, and doubling the load as a property."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tally_dev.capacity.model import (
    ROLES,
    CapacityError,
    Figure,
    Load,
    Plan,
    Rates,
    plan,
)


def small_rates(feed_size: int = 10) -> Rates:
    def f(v: float) -> Figure:
        return Figure(v, "test")

    return Rates(
        likes_per_core={"api": f(5), "relay": f(20), "aggregator": f(10), "postgres": f(4),
                        "nats": f(50), "redis": f(100)},
        feeds_per_core={"api": f(25), "postgres": f(10), "redis": f(50)},
        pg_bytes_per_like=f(200), pg_bytes_per_count=f(100), pg_wal_bytes_per_like=f(1000),
        event_bytes=f(80), redis_bytes_per_counter=f(100), hot_counter_bytes=f(300),
        feed_size=feed_size)


SMALL = Load(items=1e6, daily_users=1000, likes_per_user_per_day=86.4, peak_factor=10,
             reads_per_s=500, feed_size=10, replication=2, redis_replicas=1, regions=1,
             retention_days=2, cached_share=0.1, new_record_share=0.5, pg_cache_miss=0.2,
             utilisation=0.5, pg_cores_per_server=4, pg_disk_tb_per_server=1,
             nats_cores_per_node=4, nats_disk_tb_per_node=1, redis_gb_per_node=1,
             api_cores_per_server=8, log_partitions=16, hot_top_k=32)


def role(p: Plan, name: str) -> tuple[float, int, dict[str, float]]:
    r = next(r for r in p.roles if r.name == name)
    return r.cores, r.units, r.detail


def test_small_plan_worked_by_hand() -> None:
    p = plan(SMALL, small_rates())
    t = p.traffic
    # 1,000 users x 86.4 = 86,400 likes a day = 1/s on average, 10/s at peak (factor 10);
    # 500 count reads/s in feeds of 10 = 50 feed requests/s; 50 reads per like at peak.
    assert (t.likes_per_day, t.likes_avg_per_s, t.likes_peak_per_s) == pytest.approx((86_400, 1, 10))
    assert (t.feeds_peak_per_s, t.read_write_ratio, t.region_share) == pytest.approx((50, 50, 1))
    # Cores at 50% utilisation: busy = likes / per-core + feeds / per-core, then / 0.5.
    assert role(p, "api")[0] == pytest.approx((10 / 5 + 50 / 25) / 0.5)  # 8
    assert role(p, "relay")[0] == pytest.approx(10 / 20 / 0.5)  # 1
    assert role(p, "aggregator")[0] == pytest.approx(10 / 10 / 0.5)  # 2
    assert role(p, "postgres")[0] == pytest.approx((10 / 4 + 50 / 10) / 0.5)  # 15
    assert role(p, "nats")[0] == pytest.approx(10 / 50 / 0.5)  # 0.4
    assert role(p, "redis")[0] == pytest.approx((10 / 100 + 50 / 50) / 0.5)  # 2.2
    s = p.storage
    # Like records: 86,400 x 0.5 new records x 200 B = 8.64 MB a day, 3.1536 GB a year, x2 copies.
    assert s["like_records_per_day"] == pytest.approx(8_640_000)
    assert s["like_records_per_year"] == pytest.approx(3_153_600_000)
    assert s["like_records_per_year_all_copies"] == pytest.approx(6_307_200_000)
    assert s["wal_per_day"] == pytest.approx(86_400_000)  # 1,000 B a like
    assert s["event_log_retained"] == pytest.approx(86_400 * 80 * 2)  # 2 days of 80 B events
    assert s["event_log_retained_all_copies"] == pytest.approx(86_400 * 80 * 2 * 2)
    assert s["redis_counters"] == pytest.approx(100_000)  # 10% of a million items
    assert s["redis_per_region"] == pytest.approx(100_000 * 100 * 2)  # 100 B, one replica
    assert s["counts_table_per_region"] == pytest.approx(1e8)
    # PostgreSQL: 15 cores / 4 a server = 4 primaries (disk: 3.25 GB fits one), x2 copies = 8;
    # 2.5 likes/s each; 50 feeds x 10 seeks / 4 = 125 seeks/s, 20% from disk = 25 read IOPS.
    _, units, d = role(p, "postgres")
    assert (units, d["primaries"]) == (8, 4)
    assert d["write_iops_per_primary"] == pytest.approx(2.5)
    assert d["read_iops_per_primary"] == pytest.approx(25)
    assert d["wal_mb_per_s_per_primary"] == pytest.approx(0.0025)
    assert d["disk_tb_per_server"] == pytest.approx((3_153_600_000 + 1e8) / 4 / 1e12)
    # NATS: at least one node per copy (2); Redis: 2.2 cores -> 3 shards, x2 with replicas.
    assert role(p, "nats")[1] == 2
    assert role(p, "nats")[2]["write_mb_per_s"] == pytest.approx(10 * 80 * 2 / 1e6)
    assert role(p, "redis")[1:] == (6, {"memory_gb": pytest.approx(0.02), "shards": 3})
    assert role(p, "api")[1] == 1 and role(p, "api")[2]["processes"] == 8
    assert role(p, "api")[2]["hot_counter_kb_per_process"] == pytest.approx(32 * 300 / 1e3)
    assert (role(p, "relay")[1], role(p, "aggregator")[1]) == (1, 2)
    assert p.bandwidth == {"peak_out_per_region": 0, "peak_total": 0, "avg_total": 0}
    assert p.warnings == []


def test_three_regions_by_hand() -> None:
    """Each of 3 regions carries half the world's users (one may fail) but applies every like."""
    from dataclasses import replace

    p = plan(replace(SMALL, regions=3), small_rates())
    assert p.traffic.region_share == pytest.approx(0.5)
    assert role(p, "api")[0] == pytest.approx((5 / 5 + 25 / 25) / 0.5)  # 4
    assert role(p, "relay")[0] == pytest.approx(5 / 20 / 0.5)
    assert role(p, "aggregator")[0] == pytest.approx(10 / 10 / 0.5)  # every like, every region
    assert role(p, "postgres")[0] == pytest.approx((10 / 4 + 25 / 10) / 0.5)  # 10
    # Each region sends its third of 10 likes/s, 80 B each, to the 2 others.
    assert p.bandwidth["peak_out_per_region"] == pytest.approx(10 / 3 * 80 * 2)
    assert p.bandwidth["peak_total"] == pytest.approx(1600)
    assert p.bandwidth["avg_total"] == pytest.approx(160)
    assert p.storage["like_records_per_year_all_copies"] == pytest.approx(3_153_600_000 * 6)


def test_feed_cost_scales_with_its_size() -> None:
    """Figures measured on feeds of 10 price a feed of 20 at twice the cost."""
    from dataclasses import replace

    p = plan(replace(SMALL, feed_size=20, reads_per_s=1000), small_rates(feed_size=10))
    assert p.traffic.feeds_peak_per_s == pytest.approx(50)
    assert role(p, "api")[0] == pytest.approx((10 / 5 + 50 * 2 / 25) / 0.5)


def test_too_few_partitions_is_warned() -> None:
    from dataclasses import replace

    p = plan(replace(SMALL, daily_users=100_000, log_partitions=4), small_rates())
    assert any("log_partitions is 4" in w for w in p.warnings)


loads = st.builds(
    Load,
    items=st.floats(1e3, 1e12), daily_users=st.floats(1e3, 1e10),
    likes_per_user_per_day=st.floats(0.01, 1e3), peak_factor=st.floats(1, 50),
    reads_per_s=st.floats(1, 1e9), feed_size=st.integers(1, 500),
    replication=st.integers(1, 5), redis_replicas=st.integers(0, 3), regions=st.integers(1, 6),
    retention_days=st.floats(0.1, 60), cached_share=st.floats(0.001, 1),
    utilisation=st.floats(0.05, 1))


@settings(max_examples=200)
@given(loads, st.sampled_from([2.0, 3.0, 10.0]))
def test_scaling_the_load_scales_what_follows_it(load: Load, k: float) -> None:
    rates = small_rates()
    a, b = plan(load, rates), plan(load.scaled(k), rates)
    for ra, rb in zip(a.roles, b.roles, strict=True):
        assert rb.cores == pytest.approx(k * ra.cores, rel=1e-9)
        assert rb.units >= ra.units  # whole machines: at least as many, not exactly k times
    for key, value in a.storage.items():
        assert b.storage[key] == pytest.approx(k * value, rel=1e-9), key
    for key, value in a.bandwidth.items():
        assert b.bandwidth[key] == pytest.approx(k * value, rel=1e-9, abs=1e-12), key
    assert b.traffic.likes_peak_per_s == pytest.approx(k * a.traffic.likes_peak_per_s)
    # Ratios do not move with the load.
    assert b.traffic.read_write_ratio == pytest.approx(a.traffic.read_write_ratio)
    assert set(ROLES) == {r.name for r in a.roles}


@pytest.mark.parametrize(("change", "message"), [
    ({"items": 0}, "items must be > 0"),
    ({"daily_users": -1}, "daily_users must be > 0"),
    ({"peak_factor": 0.5}, "at least 1"),
    ({"utilisation": 1.5}, "utilisation is a share"),
    ({"feed_size": 2.5}, "feed_size must be a whole number"),
    ({"reads_per_s": math.nan}, "reads_per_s must be a finite number"),
    ({"regions": "3"}, "regions must be a finite number"),
    ({"redis_replicas": -1}, "redis_replicas must be >= 0"),
])
def test_bad_loads_are_refused_by_name(change: dict[str, object], message: str) -> None:
    with pytest.raises(CapacityError, match=message):
        Load(**change)  # type: ignore[arg-type]


def test_rates_without_a_role_or_with_zero_are_refused() -> None:
    r = small_rates()
    with pytest.raises(CapacityError, match="role 'nats'"):
        Rates({k: v for k, v in r.likes_per_core.items() if k != "nats"}, r.feeds_per_core,
              r.pg_bytes_per_like, r.pg_bytes_per_count, r.pg_wal_bytes_per_like, r.event_bytes,
              r.redis_bytes_per_counter, r.hot_counter_bytes, 10)
    with pytest.raises(CapacityError, match="event_bytes must be a positive number"):
        Rates(r.likes_per_core, r.feeds_per_core, r.pg_bytes_per_like, r.pg_bytes_per_count,
              r.pg_wal_bytes_per_like, Figure(0, "x"), r.redis_bytes_per_counter,
              r.hot_counter_bytes, 10)
