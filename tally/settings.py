"""One typed settings object, read from defaults, then a TOML file, then ``TALLY_*`` variables.

Every setting is declared once in ``Settings`` with its default and help text (field metadata),
so validation, the README's configuration table and ``tally config`` all come from one place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from tally.core.errors import ConfigError


class Group:
    """The settings' sections, in the order the README's table shows them."""

    SERVER = "server"
    COUNTERS = "counters"
    LIMITS = "limits"
    SECURITY = "security"
    CACHE = "cache"
    STORAGE = "storage"
    CLUSTER = "cluster"
    REGIONS = "regions"


def _s(default: Any, group: str, help: str) -> Any:
    meta = {"help": help, "group": group}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class CounterConfig:
    """A counter definition: ``toggle`` (on/off per user) or ``event`` (adds n per event)."""

    name: str
    kind: str  # "toggle" | "event"
    dedupe_window_s: int = 86_400


DEFAULT_COUNTERS = [
    {"name": "like", "kind": "toggle"},
    {"name": "save", "kind": "toggle"},
    {"name": "view", "kind": "event", "dedupe_window_s": 3600},
    {"name": "share", "kind": "event", "dedupe_window_s": 86_400},
]

G = Group


@dataclass(frozen=True)
class Settings:
    """Only what an operator turns: tuning that one measured value serves everywhere is a
    constant beside the code it tunes, with the reason there."""

    host: str = _s("127.0.0.1", G.SERVER, "Address the HTTP API listens on")
    port: int = _s(8080, G.SERVER, "Port the HTTP API listens on")
    workers: int = _s(1, G.SERVER, "API processes on the one port (embedded SQLite: the first also "
                                    "runs the likes writer and the aggregation, the others write "
                                    "through it and read the files directly). Metrics and rate "
                                    "limits are per process: why the default is one")
    region: str = _s("local", G.SERVER,
                     "Region stamped on events that do not name one (for rollups)")
    log_level: str = _s("INFO", G.SERVER, "Log level (DEBUG, INFO, WARNING, ERROR)")
    access_log: bool = _s(False, G.SERVER, "Log every HTTP request (costs throughput)")

    item_types: list[str] = _s(["post", "reel", "comment", "story"], G.COUNTERS,
                               "Allowed item types")
    counters: list[dict[str, Any]] = _s(DEFAULT_COUNTERS, G.COUNTERS,
                                        "Counter definitions (name, kind)")
    rollups: list[str] = _s(["day", "region"], G.COUNTERS,
                            "Rollup dimensions kept per counter and item type")

    max_batch_items: int = _s(500, G.LIMITS, "Most items in one count or has-liked request")
    max_bulk_ops: int = _s(1000, G.LIMITS, "Most operations in one bulk request")
    max_body_bytes: int = _s(1_048_576, G.LIMITS, "Largest request body accepted, in bytes")

    admin_token_file: str = _s(
        "", G.SECURITY, "File holding the admin bearer token (or set TALLY_ADMIN_TOKEN); with "
                        "neither, admin routes and /metrics answer loopback clients only")
    api_keys_file: str = _s(
        "", G.SECURITY, "TOML file of client API keys ([[key]] name, key, counters), re-read when "
                        "it changes and on SIGHUP; without it, client routes answer loopback "
                        "clients only")
    rate_per_key: float = _s(0.0, G.SECURITY, "Requests a second per API key, with bursts of ten "
                                               "seconds' worth (0: no limit)")
    rate_per_user: float = _s(20.0, G.SECURITY, "Requests a second per user_id named in a "
                                                "request, with bursts of ten seconds' worth "
                                                "(0: no limit)")
    max_connections: int = _s(4096, G.SECURITY, "Connections (and requests) one server process "
                                                "serves at once; past it 503")
    max_connections_per_client: int = _s(256, G.SECURITY,
                                         "Connections one client address may hold open at once")

    cache_size: int = _s(200_000, G.CACHE, "Entries in the in-process count cache")
    cache_ttl_s: float = _s(30.0, G.CACHE,
                            "Seconds a cached count may be served before it is re-read")
    hot_ttl_s: float = _s(0.25, G.CACHE,
                          "Seconds a hot item's count is served from memory in cluster mode (and "
                          "in the extra API processes of embedded mode): its staleness, for one "
                          "read of the count store per period per process")

    backend: str = _s("sqlite", G.STORAGE, "Storage: 'sqlite' (embedded, one process) or "
                                           "'cluster' (PostgreSQL, NATS JetStream, Redis)")
    aggregate_window_ms: float = _s(100.0, G.STORAGE,
                                    "Longest time a delta waits before it is applied to the counts")
    data_dir: str = _s("./data", G.STORAGE, "Directory of the embedded SQLite database")
    sqlite_synchronous: str = _s(
        "FULL", G.STORAGE, "SQLite durability: FULL survives power loss (no write is answered "
                           "before it is on disk), NORMAL survives process crashes")
    sqlite_likes_shards: int = _s(
        1, G.STORAGE, "Files the like records are split over, by user, each with a writer "
                      "process of its own; fixed for the life of the data")

    role: str = _s("all", G.CLUSTER, "Cluster process role: api, relay, aggregator or all")
    postgres_dsns: list[str] = _s([], G.CLUSTER,
                                  "Physical PostgreSQL databases, in shard-map order")
    logical_shards: int = _s(4096, G.CLUSTER, "Logical shards; fixed for the life of the data")
    shard_map: list[str] = _s([], G.CLUSTER, "Logical shard ranges to databases, "
                                             "'FIRST-LAST=DB_INDEX'; empty: an even split. The "
                                             "initial map: stored at the first start, then "
                                             "changed only by tally shards move")
    postgres_synchronous_commit: str = _s(
        "on", G.CLUSTER, "PostgreSQL durability per transaction: 'on' waits for the WAL fsync "
                         "(and a synchronous standby's flush, if any) before a write is "
                         "acknowledged")
    postgres_pool_max: int = _s(10, G.CLUSTER,
                                "Connections per physical PostgreSQL database, per process")
    outbox_slots: int = _s(4, G.CLUSTER, "Outbox sources per database: commits that take "
                                         "change-log numbers concurrently; only ever increase it")
    nats_url: str = _s("nats://127.0.0.1:4222", G.CLUSTER, "NATS servers with JetStream, "
                       "comma-separated: the client connects to any and fails over to the others")
    nats_stream: str = _s("TALLY_EVENTS", G.CLUSTER,
                          "JetStream stream holding the change events")
    log_partitions: int = _s(16, G.CLUSTER, "Event-log partitions, by (counter, item) hash")
    log_max_age_s: float = _s(7 * 86_400.0, G.CLUSTER,
                              "Seconds the event log keeps a message")
    redis_url: str = _s("redis://127.0.0.1:6379/0", G.CLUSTER, "Redis for hot counts")
    redis_cluster: bool = _s(False, G.CLUSTER, "Connect to redis_url as a Redis Cluster")
    redis_ttl_s: int = _s(3600, G.CLUSTER,
                          "Seconds a count stays in Redis after its last write")
    redis_timeout_ms: float = _s(100.0, G.CLUSTER,
                                 "Redis socket timeout; past it reads go to PostgreSQL")
    lease_period_ms: float = _s(500.0, G.CLUSTER,
                                "How often relays and aggregators rebalance their leases")
    # High availability (issue 13): how Tally rides out a failover of the engines under it.
    postgres_failover_s: float = _s(
        30.0, G.CLUSTER, "How long an operation keeps retrying a PostgreSQL database that lost "
                         "its primary (a multi-host DSN with target_session_attrs=read-write finds "
                         "the new one) before it fails with 503; only retry-safe operations are "
                         "retried")
    nats_replicas: int = _s(1, G.CLUSTER, "Replicas of the event-log stream: 3 on a three-node "
                                          "JetStream cluster, so a publish is acknowledged once a "
                                          "quorum stored it")
    # Regions (issue 14, docs/regions.md): deployments that each hold every count.
    region_name: str = _s("", G.REGIONS, "This deployment's region, also its JetStream domain; "
                                         "empty: one region. Needs backend 'cluster'")
    region_peers: list[str] = _s([], G.REGIONS, "The other regions as 'NAME=API_URL': their event "
                                                "logs are sourced, and writes of users homed there "
                                                "forwarded to their API")
    region_key_file: str = _s("", G.REGIONS, "File holding the API key this region presents to "
                                             "its peers' APIs when it forwards a write (a key in "
                                             "their api_keys_file)")
    sync_counters: list[str] = _s([], G.REGIONS, "Toggle counters with replication = \"sync\": a "
                                                 "change is acknowledged only once another "
                                                 "region's log holds it (zero loss with a region, "
                                                 "at one inter-region round trip per write; with "
                                                 "no peer reachable their writes are refused with "
                                                 "503). Other counters replicate asynchronously")
    region_witness_urls: list[str] = _s([], G.REGIONS, "etcd client URLs of the quorum shared by "
                                                       "the regions (a member per region and a "
                                                       "witness in a third place), this region's "
                                                       "first: automatic failover of a region "
                                                       "whose lease expired. Empty: failover is "
                                                       "the operator's (`tally region failover`)")
    region_witness_ttl_s: float = _s(10.0, G.REGIONS, "Lease of each API process in the witness "
                                                      "quorum: a region silent this long is "
                                                      "failed over; one that cannot renew stops "
                                                      "deciding for its users before it expires")

    def counter_defs(self) -> dict[str, CounterConfig]:
        return {c.name: c for c in (CounterConfig(**raw) for raw in self.counters)}

    @property
    def sqlite_path(self) -> Path:
        return Path(self.data_dir) / "tally.db"

    def replace(self, **changes: Any) -> Settings:
        return validate(dataclasses.replace(self, **changes))


class SettingInfo(NamedTuple):
    group: str
    name: str
    env: str
    default: Any
    help: str


def describe() -> list[SettingInfo]:
    """Every setting, in declaration order (which keeps each group together)."""
    rows = []
    for f in dataclasses.fields(Settings):
        factory: Any = f.default_factory
        default = f.default if f.default is not dataclasses.MISSING else factory()
        rows.append(SettingInfo(f.metadata["group"], f.name, f"TALLY_{f.name.upper()}", default,
                                f.metadata["help"]))
    return rows


def _coerce(name: str, raw: Any, kind: type, text: bool) -> Any:
    """``text``: the value came from an environment variable, so it is parsed from a string;
    TOML values carry their own type and must already have the right one."""
    if text and isinstance(raw, str) and kind is not str:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{name}: expected a boolean, got {raw!r}")
        if kind is list:
            if raw.lstrip().startswith("["):  # JSON, for lists of tables such as counters
                try:
                    return json.loads(raw)
                except ValueError as exc:
                    raise ConfigError(f"{name}: invalid JSON list: {exc}") from exc
            return [part.strip() for part in raw.split(",") if part.strip()]
        try:
            return kind(raw)
        except ValueError as exc:
            raise ConfigError(f"{name}: expected {kind.__name__}, got {raw!r}") from exc
    if kind is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if not isinstance(raw, kind) or (kind is int and isinstance(raw, bool)):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {type(raw).__name__}")
    return raw


_KINDS: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}


def _kind(annotation: Any) -> type:
    text = str(annotation)
    return list if text.startswith("list") else _KINDS[text]


def load(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> Settings:
    """Defaults, overlaid by the TOML file (``path`` or ``$TALLY_CONFIG``), then the environment."""
    env = dict(os.environ) if env is None else env
    path = path or env.get("TALLY_CONFIG")
    values: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as fh:
                values.update(tomllib.load(fh).get("tally", {}))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    known = {f.name: f for f in dataclasses.fields(Settings)}
    from_env: set[str] = set()
    for key, _f in known.items():
        if (raw := env.get(f"TALLY_{key.upper()}")) is not None:
            values[key] = raw
            from_env.add(key)
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
    typed = {k: _coerce(k, v, _kind(known[k].type), k in from_env) for k, v in values.items()}
    return validate(Settings(**typed))


_MINIMA = dict.fromkeys(("cache_size", "max_batch_items", "max_bulk_ops", "max_body_bytes",
                         "logical_shards", "log_partitions", "postgres_pool_max",
                         "outbox_slots", "redis_ttl_s", "sqlite_likes_shards",
                         "max_connections", "max_connections_per_client", "workers"), 1)


def _validate_security(s: Settings) -> None:
    for name in ("rate_per_key", "rate_per_user"):
        if getattr(s, name) < 0:
            raise ConfigError(f"{name} must not be negative")


_REGION_RE = re.compile(r"[a-z][a-z0-9]{0,15}")


def region_peers(s: Settings) -> dict[str, str]:
    """``region_peers`` as {name: API URL}."""
    return dict(p.split("=", 1) for p in s.region_peers)


def _validate_regions(s: Settings) -> None:
    if not s.region_name:
        if s.region_peers or s.region_witness_urls:
            raise ConfigError("region_peers and region_witness_urls: each needs region_name")
        return
    if s.backend != "cluster":
        raise ConfigError("regions need backend 'cluster'")
    names = [s.region_name]
    for peer in s.region_peers:
        name, eq, url = peer.partition("=")
        if not eq or not url.startswith("http"):
            raise ConfigError(f"region_peers: {peer!r} is not NAME=http://HOST:PORT")
        names.append(name)
    for name in names:
        if not _REGION_RE.fullmatch(name):
            raise ConfigError(f"region name {name!r} must match [a-z][a-z0-9]{{0,15}}")
    if len(set(names)) != len(names):
        raise ConfigError("region names must be distinct")
    for url in s.region_witness_urls:
        if not url.startswith("http"):
            raise ConfigError(f"region_witness_urls: {url!r} is not http://HOST:PORT")
    if not 2.0 <= s.region_witness_ttl_s <= 300.0:
        raise ConfigError("region_witness_ttl_s must be within 2-300 s")
    if s.sync_counters and not s.region_peers:
        raise ConfigError("sync_counters needs region_peers: another region must hold the change")


def _validate_sync_counters(s: Settings) -> None:
    """Only toggles: their copy held by a peer is a state, applied at a failover by comparing
    records; an increment's copy would need per-event de-duplication there."""
    if s.sync_counters and not s.region_name:
        raise ConfigError("sync_counters needs region_name and region_peers")
    kinds = {c.get("name"): c.get("kind") for c in s.counters if isinstance(c, dict)}
    for name in s.sync_counters:
        if kinds.get(name) != "toggle":
            raise ConfigError(f"sync_counters: {name!r} is not a toggle counter (only toggles can "
                              "replicate synchronously)")


def validate(s: Settings) -> Settings:
    """Reject settings that cannot run, with the reason, before anything starts."""
    _validate_security(s)
    if s.sqlite_synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
        raise ConfigError("sqlite_synchronous must be FULL, NORMAL or EXTRA")
    for name, least in _MINIMA.items():
        if getattr(s, name) < least:
            raise ConfigError(f"{name} must be at least {least}")
    if s.backend not in ("sqlite", "cluster"):
        raise ConfigError("backend must be 'sqlite' or 'cluster'")
    if s.role not in ("api", "relay", "aggregator", "all"):
        raise ConfigError("role must be api, relay, aggregator or all")
    if s.backend == "sqlite" and s.role != "all":
        raise ConfigError("roles (api, relay, aggregator) need backend 'cluster'")
    if s.backend == "cluster" and not s.postgres_dsns:
        raise ConfigError("backend 'cluster' needs postgres_dsns")
    if s.postgres_synchronous_commit not in ("on", "remote_apply", "remote_write", "local", "off"):
        raise ConfigError("postgres_synchronous_commit must be on, remote_apply, remote_write, "
                          "local or off")
    if s.postgres_dsns or s.shard_map:
        from tally.store.shards import ShardMap

        ShardMap.build(s.logical_shards, max(len(s.postgres_dsns), 1), s.shard_map)
    _validate_regions(s)
    bad_rollups = set(s.rollups) - {"day", "region"}
    if bad_rollups:
        raise ConfigError(f"unknown rollups: {sorted(bad_rollups)} (allowed: day, region)")
    from tally.core.errors import InvalidInput
    from tally.core.model import validate_counter_configs, validate_item_types

    try:
        validate_item_types(s.item_types)
        validate_counter_configs(s.counters)
    except InvalidInput as exc:  # a settings problem, reported as one (the CLI catches these)
        raise ConfigError(f"{exc.field}: {exc.message}", exc.field) from exc
    _validate_sync_counters(s)
    return s
