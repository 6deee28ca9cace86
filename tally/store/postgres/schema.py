"""The PostgreSQL schema (the same in every physical database) and the connection pools to them.

Each physical database holds, for the users whose logical shard maps to it, the toggle records and
their transactional outbox; and, for the items that map to it, the counts. Database 0 is also the
coordinator of the aggregation: it keeps the consumers' watermarks, the rollups and the intents of
batches that span databases (see ``postgres_counts``).
"""

from __future__ import annotations

import asyncpg

from tally.core.errors import ConfigError

SCHEMA_VERSION = 1
_MIGRATE_LOCK = 7_426_001  # advisory lock: one process migrates at a time

SCHEMA = """
CREATE TABLE IF NOT EXISTS tally_meta (key text PRIMARY KEY, value text NOT NULL);

-- Toggle records of the users whose logical shard maps here (the source of truth).
CREATE TABLE IF NOT EXISTS toggles (
    counter text NOT NULL, user_id text NOT NULL, item text NOT NULL,
    state boolean NOT NULL, version bigint NOT NULL, updated_at double precision NOT NULL,
    shard integer NOT NULL,
    PRIMARY KEY (counter, user_id, item)
);
CREATE INDEX IF NOT EXISTS toggles_on_by_item ON toggles (counter, item) WHERE state;

-- The transactional outbox: one row per real change, written in the toggle's transaction.
-- Each source (this database's outbox slot) numbers its rows in commit order (see postgres.py).
CREATE TABLE IF NOT EXISTS outbox_heads (source text PRIMARY KEY, seq bigint NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    source text NOT NULL, seq bigint NOT NULL, shard integer NOT NULL,
    counter text NOT NULL, item text NOT NULL, user_id text, delta bigint NOT NULL,
    ts double precision NOT NULL, region text NOT NULL,
    PRIMARY KEY (source, seq)
);
CREATE INDEX IF NOT EXISTS outbox_by_key ON outbox (counter, item);

-- Idempotency keys of event counters, kept for each counter's window.
CREATE TABLE IF NOT EXISTS idempotency (
    counter text NOT NULL, key text NOT NULL, expires_at double precision NOT NULL,
    PRIMARY KEY (counter, key)
);
CREATE INDEX IF NOT EXISTS idempotency_expiry ON idempotency (expires_at);

-- Counts of the items whose logical shard maps here.
-- Keyed (counter, item): batch reads name both, and reconcile scans a counter in item order.
CREATE TABLE IF NOT EXISTS counts (
    item text NOT NULL, counter text NOT NULL, count bigint NOT NULL,
    PRIMARY KEY (counter, item)
);
-- The last cross-database intent of each consumer applied here (idempotent roll-forward).
CREATE TABLE IF NOT EXISTS applied_intents (consumer text PRIMARY KEY, intent bigint NOT NULL);

-- Coordinator only (database 0): watermarks, rollups, consumers' intent numbers and intents.
CREATE TABLE IF NOT EXISTS watermarks (
    consumer text NOT NULL, source text NOT NULL, seq bigint NOT NULL,
    PRIMARY KEY (consumer, source)
);
CREATE TABLE IF NOT EXISTS rollups (
    counter text NOT NULL, item_type text NOT NULL, dimension text NOT NULL,
    bucket text NOT NULL, value bigint NOT NULL,
    PRIMARY KEY (counter, item_type, dimension, bucket)
);
-- Regions (docs/regions.md): the placement map of each epoch, and the changes a returned region
-- had acknowledged that lost to a newer epoch's decision (``tally region conflicts``).
CREATE TABLE IF NOT EXISTS placement (epoch integer PRIMARY KEY, body jsonb NOT NULL);
CREATE TABLE IF NOT EXISTS region_conflicts (
    source text NOT NULL, seq bigint NOT NULL, counter text NOT NULL, item text NOT NULL,
    user_id text NOT NULL, event_on boolean NOT NULL, event_ts double precision NOT NULL,
    record_on boolean, record_ts double precision, epoch integer NOT NULL,
    listed_at double precision NOT NULL,
    PRIMARY KEY (source, seq, counter, item)
);
CREATE TABLE IF NOT EXISTS consumers (consumer text PRIMARY KEY, last_intent bigint NOT NULL);
-- Online resharding (reshard.py). The shard map's epochs (epoch 0 is the settings' map, never
-- stored); the head row every process polls, with the count fence of a move in progress; the
-- processes' acknowledgements of the epoch they route by; the journal of moves.
CREATE TABLE IF NOT EXISTS shard_maps (
    epoch integer PRIMARY KEY, ranges text[] NOT NULL, made_at double precision NOT NULL);
CREATE TABLE IF NOT EXISTS shard_map_head (
    one boolean PRIMARY KEY DEFAULT true CHECK (one), epoch integer NOT NULL,
    counts_fence_first integer, counts_fence_last integer);
INSERT INTO shard_map_head (epoch) VALUES (0) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS shard_map_readers (
    reader text PRIMARY KEY, epoch integer NOT NULL, seen_at timestamptz NOT NULL);
CREATE TABLE IF NOT EXISTS shard_moves (
    id bigserial PRIMARY KEY, first_shard integer NOT NULL, last_shard integer NOT NULL,
    source integer NOT NULL, target integer NOT NULL, step text NOT NULL,
    started_at double precision NOT NULL, updated_at double precision NOT NULL,
    detail jsonb NOT NULL DEFAULT '{}');
CREATE UNIQUE INDEX IF NOT EXISTS one_active_move ON shard_moves ((true))
    WHERE step NOT IN ('done', 'aborted');
-- A move's source: the keys changed in the moving range while it copies (its catch-up).
CREATE TABLE IF NOT EXISTS move_changes (
    id bigserial PRIMARY KEY, tbl text NOT NULL, k1 text NOT NULL, k2 text NOT NULL,
    k3 text NOT NULL DEFAULT '');
CREATE OR REPLACE FUNCTION tally_capture() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
    IF TG_TABLE_NAME = 'toggles' THEN
        INSERT INTO move_changes (tbl, k1, k2, k3) VALUES ('toggles', NEW.counter, NEW.user_id,
                                                           NEW.item);
    ELSIF TG_TABLE_NAME = 'counts' THEN
        INSERT INTO move_changes (tbl, k1, k2) VALUES ('counts', NEW.counter, NEW.item);
    ELSE
        INSERT INTO move_changes (tbl, k1, k2) VALUES ('idempotency', NEW.counter, NEW.key);
    END IF;
    RETURN NULL;
END $f$;
-- The write guard: a row of a logical shard this database does not hold (moved away, or being
-- moved in) is refused with SQLSTATE TL001, which the API answers 503 with Retry-After. The
-- move's own copier sets tally.copier to write the rows it brings in.
CREATE OR REPLACE FUNCTION tally_guard() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
    IF current_setting('tally.copier', true) = 'on' THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'logical shard % is not held by this database (moving or moved)',
        NEW.shard USING ERRCODE = 'TL001';
END $f$;
CREATE TABLE IF NOT EXISTS intents (
    consumer text NOT NULL, intent bigint NOT NULL, parts jsonb NOT NULL,
    PRIMARY KEY (consumer, intent)
);
"""


async def migrate(conn: asyncpg.Connection, db_index: int) -> None:
    """Create the schema; refuse a database that another position in ``postgres_dsns`` owns."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATE_LOCK)
        await conn.execute(SCHEMA)
        rows = dict(await conn.fetch("SELECT key, value FROM tally_meta"))
        if int(rows.get("schema_version", SCHEMA_VERSION)) > SCHEMA_VERSION:
            raise ConfigError(f"database schema {rows['schema_version']} is newer than this "
                              f"Tally ({SCHEMA_VERSION})")
        if "db_index" in rows and int(rows["db_index"]) != db_index:
            raise ConfigError(f"database listed at postgres_dsns[{db_index}] was created as "
                              f"postgres_dsns[{rows['db_index']}]; the list order is part of "
                              "the shard map and must not change")
        await conn.execute("INSERT INTO tally_meta VALUES ('schema_version', $1), ('db_index', $2) "
                           "ON CONFLICT (key) DO NOTHING", str(SCHEMA_VERSION), str(db_index))
