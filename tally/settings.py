"""One typed settings object, read from defaults, then a TOML file, then ``TALLY_*`` variables.

Every setting is declared once in ``Settings`` with its default and help text (field metadata),
so validation, the README's configuration table and ``tally config`` all come from one place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tally.core.errors import ConfigError


def _s(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


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


@dataclass(frozen=True)
class Settings:
    host: str = _s("127.0.0.1", "Address the HTTP API listens on")
    port: int = _s(8080, "Port the HTTP API listens on")
    workers: int = _s(1, "uvicorn worker processes (embedded SQLite mode needs exactly 1)")
    region: str = _s("local", "Region stamped on events that do not name one (for rollups)")
    data_dir: str = _s("./data", "Directory of the embedded SQLite database")
    sqlite_synchronous: str = _s(
        "FULL", "SQLite durability: FULL survives power loss, NORMAL survives process crashes"
    )
    sqlite_pipelined_sync: bool = _s(
        True, "With FULL: the likes writer syncs its WAL from a thread of its own and answers a "
              "commit once that sync has covered it, running the next batch meanwhile (the same "
              "durability, the fsync off the writer's path); false: SQLite syncs inside COMMIT")
    item_types: list[str] = _s(["post", "reel", "comment", "story"], "Allowed item types")
    counters: list[dict[str, Any]] = _s(DEFAULT_COUNTERS, "Counter definitions (name, kind)")
    group_commit_ms: float = _s(0.0, "Extra wait for more writes before a commit; 0: writes that "
                                "arrive during a commit (and each event-loop turn's) share the next")
    sqlite_wal_autocheckpoint: int = _s(
        1000, "WAL pages after which a commit copies them into the database (SQLite's default); "
              "more: fewer, larger checkpoints, each one a longer pause of the writer. With "
              "sqlite_checkpoint_ms on, the writers do so only at a hundred times this, as a backstop")
    sqlite_checkpoint_ms: float = _s(
        50.0, "How often a thread of its own copies the WAL into both database files (passive "
              "checkpoints, which block no one), so commits do not pause for it; 0: the "
              "committing writer checkpoints, as SQLite does by default")
    sqlite_mmap_mb: int = _s(1024, "MiB of each SQLite file read through a memory map (address "
                                   "space, not memory: the pages are the OS file cache); 0: off")
    sqlite_writer_process: bool = _s(
        True, "Run the likes writer in a child process of its own, so its commits do not share "
              "the server's interpreter lock with HTTP; false: a thread of the server")
    sqlite_likes_shards: int = _s(
        1, "Files the like records are split over, by user, each with a writer process of its "
           "own (needs sqlite_writer_process); fixed for the life of the data")
    group_commit_max: int = _s(1000, "Most operations committed in one transaction: a commit "
                                     "answers all its requests at once, so its size is a floor "
                                     "under their latency")
    aggregate_window_ms: float = _s(100.0, "Longest time a delta waits before it is applied")
    aggregate_max_events: int = _s(20_000, "Most change-log events applied in one transaction")
    rollups: list[str] = _s(["day", "region"], "Rollup dimensions kept per counter and item type")
    cache_size: int = _s(200_000, "Entries in the in-process count cache")
    cache_ttl_s: float = _s(30.0, "Seconds a cached count may be served before it is re-read")
    hot_ttl_s: float = _s(1.0, "Seconds a hot item's count is served from memory in cluster mode")
    hot_top_k: int = _s(32, "Hot items tracked by the heavy-hitter sketch")
    hot_sample: int = _s(8, "One read in N, at random, feeds the sketch (weighted N); 1 = every read")
    max_batch_items: int = _s(500, "Most items in one count or has-liked request")
    max_bulk_ops: int = _s(1000, "Most operations in one bulk request")
    max_body_bytes: int = _s(1_048_576, "Largest request body accepted, in bytes")
    read_threads: int = _s(4, "Threads serving SQLite reads")
    inline_reads: bool = _s(True, "Run SQLite count and has-liked lookups on the event loop "
                            "instead of a read thread (cheaper than the hand-off)")
    backend: str = _s("sqlite", "Storage: 'sqlite' (embedded, one process) or 'cluster' (PostgreSQL, "
                           "NATS JetStream, Redis)")
    role: str = _s("all", "Cluster process role: api, relay, aggregator or all")
    postgres_dsns: list[str] = _s([], "Physical PostgreSQL databases, in shard-map order (cluster)")
    logical_shards: int = _s(4096, "Logical shards; fixed for the life of the data (cluster)")
    shard_map: list[str] = _s([], "Logical shard ranges to databases, 'FIRST-LAST=DB_INDEX'; "
                                  "empty: an even split (cluster)")
    postgres_synchronous_commit: str = _s(
        "on", "PostgreSQL durability per transaction: 'on' waits for the WAL fsync (and a synchronous "
              "standby's flush, if any) before a write is acknowledged (cluster)")
    postgres_pool_max: int = _s(10, "Connections per physical PostgreSQL database, per process "
                                    "(cluster)")
    outbox_slots: int = _s(4, "Outbox sources per database: commits that take change-log "
                              "numbers concurrently; only ever increase it (cluster)")
    reconcile_settle_s: float = _s(2.0, "Seconds a drift must hold still before it is reported or "
                                        "repaired; above the event-log lag (cluster)")
    nats_url: str = _s("nats://127.0.0.1:4222", "NATS servers with JetStream, comma-separated: "
                            "the client connects to any and fails over to the others (cluster)")
    nats_stream: str = _s("TALLY_EVENTS", "JetStream stream holding the change events (cluster)")
    log_partitions: int = _s(16, "Event-log partitions, by (counter, item) hash (cluster)")
    redis_url: str = _s("redis://127.0.0.1:6379/0", "Redis for hot counts (cluster)")
    redis_cluster: bool = _s(False, "Connect to redis_url as a Redis Cluster (cluster)")
    redis_ttl_s: int = _s(3600, "Seconds a count stays in Redis after its last write (cluster)")
    redis_timeout_ms: float = _s(100.0, "Redis socket timeout; past it reads go to PostgreSQL (cluster)")
    relay_batch: int = _s(1000, "Most outbox rows a relay publishes per round and source (cluster)")
    lease_period_ms: float = _s(500.0, "How often relays and aggregators rebalance their leases "
                                       "(cluster)")
    # High availability (issue 13): how Tally rides out a failover of the engines under it.
    postgres_failover_s: float = _s(
        30.0, "How long an operation keeps retrying a PostgreSQL database that lost its primary "
              "(a multi-host DSN with target_session_attrs=read-write finds the new one) before it "
              "fails with 503; only retry-safe operations are retried (cluster)")
    nats_replicas: int = _s(1, "Replicas of the event-log stream: 3 on a three-node JetStream "
                               "cluster, so a publish is acknowledged once a quorum stored it "
                               "(cluster)")
    log_max_age_s: float = _s(7 * 86_400.0, "Seconds the event log keeps a message (cluster)")
    gc_threshold: int = _s(10_000, "Allocations between young garbage collections in a server "
                           "process and its writer children (Python's default: 700); 0 leaves the "
                           "collector alone")
    log_level: str = _s("INFO", "Log level (DEBUG, INFO, WARNING, ERROR)")
    access_log: bool = _s(False, "Log every HTTP request (costs throughput)")

    def counter_defs(self) -> dict[str, CounterConfig]:
        return {c.name: c for c in (CounterConfig(**raw) for raw in self.counters)}

    @property
    def sqlite_path(self) -> Path:
        return Path(self.data_dir) / "tally.db"

    def replace(self, **changes: Any) -> Settings:
        return validate(dataclasses.replace(self, **changes))


def describe() -> list[tuple[str, str, Any, str]]:
    """(name, env var, default, help) for every setting, in declaration order."""
    rows = []
    for f in dataclasses.fields(Settings):
        factory: Any = f.default_factory
        default = f.default if f.default is not dataclasses.MISSING else factory()
        rows.append((f.name, f"TALLY_{f.name.upper()}", default, f.metadata["help"]))
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


_MINIMA = {**dict.fromkeys(("group_commit_max", "aggregate_max_events", "cache_size",
                             "max_batch_items", "max_bulk_ops", "max_body_bytes", "read_threads",
                             "hot_top_k", "hot_sample", "logical_shards", "log_partitions",
                             "postgres_pool_max", "outbox_slots", "relay_batch", "redis_ttl_s",
                             "sqlite_wal_autocheckpoint", "sqlite_likes_shards"), 1),
           "sqlite_mmap_mb": 0, "sqlite_checkpoint_ms": 0}


def validate(s: Settings) -> Settings:
    """Reject settings that cannot run, with the reason, before anything starts."""
    if s.sqlite_synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
        raise ConfigError("sqlite_synchronous must be FULL, NORMAL or EXTRA")
    for name, least in _MINIMA.items():
        if getattr(s, name) < least:
            raise ConfigError(f"{name} must be at least {least}")
    if s.backend not in ("sqlite", "cluster"):
        raise ConfigError("backend must be 'sqlite' or 'cluster'")
    if s.role not in ("api", "relay", "aggregator", "all"):
        raise ConfigError("role must be api, relay, aggregator or all")
    if s.backend == "sqlite" and s.workers != 1:
        raise ConfigError("workers must be 1 with the embedded sqlite backend (one writer process)")
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
    return s
