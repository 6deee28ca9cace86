"""Settings: defaults run, a TOML file, then TALLY_* variables; anything unknown or mistyped fails."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tally.core.errors import ConfigError
from tally.runtime import schema_of
from tally.settings import Settings, describe, load, region_peers, validate


def test_defaults_run() -> None:
    s = load(env={})
    assert s == validate(Settings())
    assert (s.port, s.backend, s.sqlite_synchronous) == (8080, "sqlite", "FULL")
    assert sorted(schema_of(s).counters) == ["like", "save", "share", "view"]
    assert schema_of(s).toggles == ["like", "save"]
    names = [row.name for row in describe()]
    assert len(names) == len(set(names)) and "max_body_bytes" in names
    assert all(row.env == f"TALLY_{row.name.upper()}" and row.help for row in describe())


def test_settings_are_grouped_and_each_group_is_declared_together() -> None:
    groups = [row.group for row in describe()]
    assert set(groups) == {"server", "counters", "limits", "security", "cache", "storage",
                           "cluster", "regions"}
    changes = sum(1 for a, b in itertools.pairwise(groups) if a != b)
    assert changes == len(set(groups)) - 1  # each group's rows are contiguous in the table
    assert len(groups) <= 50  # 38, the security group (issue 16) added 6, regions 4, the witness 2


def test_regions_are_validated() -> None:
    base = {"TALLY_BACKEND": "cluster", "TALLY_POSTGRES_DSNS": "postgresql://h/db"}
    s = load(env={**base, "TALLY_REGION_NAME": "us",
                  "TALLY_REGION_PEERS": "eu=http://10.0.0.2:8080"})
    assert region_peers(s) == {"eu": "http://10.0.0.2:8080"}
    for bad, why in [({"TALLY_REGION_PEERS": "eu=http://x"}, "needs region_name"),
                     ({"TALLY_REGION_NAME": "us", "TALLY_REGION_PEERS": "eu"}, "NAME=http"),
                     ({"TALLY_REGION_NAME": "us", "TALLY_REGION_PEERS": "us=http://x"},
                      "distinct"),
                     ({"TALLY_REGION_NAME": "US_1"}, "must match"),
                     ({"TALLY_REGION_WITNESS_URLS": "http://e:2379"}, "needs region_name"),
                     ({"TALLY_REGION_NAME": "us", "TALLY_REGION_WITNESS_URLS": "e:2379"},
                      "not http"),
                     ({"TALLY_REGION_NAME": "us", "TALLY_REGION_WITNESS_TTL_S": "1"}, "2-300")]:
        with pytest.raises(ConfigError, match=why):
            load(env={**base, **bad})
    with pytest.raises(ConfigError, match="backend 'cluster'"):
        load(env={"TALLY_REGION_NAME": "us"})


def test_sync_counters_are_toggles_of_a_region_with_peers() -> None:
    region = {"TALLY_BACKEND": "cluster", "TALLY_POSTGRES_DSNS": "postgresql://h/db",
              "TALLY_REGION_NAME": "us", "TALLY_REGION_PEERS": "eu=http://10.0.0.2:8080"}
    assert load(env={**region, "TALLY_SYNC_COUNTERS": "like"}).sync_counters == ["like"]
    for bad, why in [({**region, "TALLY_SYNC_COUNTERS": "view"}, "not a toggle counter"),
                     ({**region, "TALLY_SYNC_COUNTERS": "nope"}, "not a toggle counter"),
                     ({**region, "TALLY_REGION_PEERS": "", "TALLY_SYNC_COUNTERS": "like"},
                      "needs region_peers"),
                     ({"TALLY_SYNC_COUNTERS": "like"}, "needs region_name")]:
        with pytest.raises(ConfigError, match=why):
            load(env=bad)


def test_env_overrides(tmp_path: Path) -> None:
    s = load(env={"TALLY_PORT": "9001", "TALLY_ACCESS_LOG": "yes", "TALLY_CACHE_TTL_S": "2.5",
                  "TALLY_ITEM_TYPES": "post, video ,", "TALLY_DATA_DIR": str(tmp_path),
                  "UNRELATED": "x"})
    assert (s.port, s.access_log, s.cache_ttl_s, s.item_types) == (9001, True, 2.5,
                                                                   ["post", "video"])
    assert s.sqlite_path == tmp_path / "tally.db"


def test_counters_as_a_json_list() -> None:
    s = load(env={"TALLY_COUNTERS": '[{"name": "like", "kind": "toggle"}, '
                                    '{"name": "clap", "kind": "event", "dedupe_window_s": 5}]'})
    assert schema_of(s).counter("clap").dedupe_window_s == 5
    with pytest.raises(ConfigError, match="counters: invalid JSON"):
        load(env={"TALLY_COUNTERS": '[{"name": '})


def test_toml_file_then_env(tmp_path: Path) -> None:
    cfg = tmp_path / "tally.toml"
    cfg.write_text('[tally]\nport = 7000\naggregate_window_ms = 50\nitem_types = ["post", "pin"]\n'
                   '[[tally.counters]]\nname = "like"\nkind = "toggle"\n'
                   '[[tally.counters]]\nname = "bookmark"\nkind = "toggle"\n')
    s = load(cfg, env={"TALLY_PORT": "7001"})
    assert (s.port, s.aggregate_window_ms, s.item_types) == (7001, 50.0, ["post", "pin"])
    assert schema_of(s).toggles == ["like", "bookmark"]
    assert load(env={"TALLY_CONFIG": str(cfg)}).port == 7000


@pytest.mark.parametrize(("toml", "env", "message"), [
    ("[tally]\nprot = 1\n", {}, "unknown settings: prot"),
    ("", {"TALLY_NOPE": "1"}, None),  # unknown variables are not settings: ignored
    ("[tally]\nport = '80'\n", {}, "port: expected int, got str"),
    ("[tally]\nport = true\n", {}, "port: expected int, got bool"),
    ("[tally]\naccess_log = 1\n", {}, "access_log: expected bool"),
    ("[tally]\nitem_types = 'post'\n", {}, "item_types: expected list"),
    ("", {"TALLY_PORT": "eighty"}, "port: expected int"),
    ("", {"TALLY_ACCESS_LOG": "maybe"}, "access_log: expected a boolean"),
    ("", {"TALLY_CACHE_SIZE": "0"}, "cache_size must be at least 1"),
    ("", {"TALLY_SQLITE_SYNCHRONOUS": "OFF"}, "sqlite_synchronous"),
    ("", {"TALLY_SQLITE_LIKES_SHARDS": "0"}, "sqlite_likes_shards must be at least 1"),
    ("[tally]\ngroup_commit_ms = 1.0\n", {}, "unknown settings: group_commit_ms"),
    ("", {"TALLY_BACKEND": "mongo"}, "backend"),
    ("", {"TALLY_BACKEND": "cluster"}, "postgres_dsns"),
    ("", {"TALLY_ROLLUPS": "day,week"}, "unknown rollups"),
    ("[tally\n", {}, "not valid TOML"),
])
def test_rejected(tmp_path: Path, toml: str, env: dict[str, str], message: str | None) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text(toml)
    if message is None:
        load(cfg, env=env)
        return
    with pytest.raises(ConfigError, match=message):
        load(cfg, env=env)


def test_bad_names_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="item_types: item type 'Post'"):
        load(env={"TALLY_ITEM_TYPES": "Post"})
    with pytest.raises(ConfigError, match="counters: counter like: kind"):
        load(env={"TALLY_COUNTERS": '[{"name": "like", "kind": "gauge"}]'})
    with pytest.raises(ConfigError, match="not found"):
        load("/nonexistent/tally.toml", env={})


def test_replace_validates() -> None:
    assert Settings().replace(port=1).port == 1
    with pytest.raises(ConfigError):
        Settings().replace(max_bulk_ops=0)


def test_the_readme_table_is_what_tally_config_prints(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's settings tables come from the one table: `tally config --markdown`."""
    import argparse

    from tally.cli import cmd_config

    assert cmd_config(argparse.Namespace(markdown=True, config=None)) == 0
    printed = capsys.readouterr().out.strip()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("**server**\n")
    end = readme.index("\n\nCounters are defined in the file", start)
    assert readme[start:end].strip() == printed, "regenerate it: tally config --markdown"
