"""The HA development topology (``tally cluster up --ha``): what it starts and how it reports roles.

Three etcd members; per shard database a Patroni-managed primary and a synchronous standby
(``pg<N>-a``, ``pg<N>-b``, Patroni scope ``tally-pg<N>``); three NATS servers in one JetStream
cluster (``nats-0..2``) holding the event log at three replicas; Redis as a cache. Tally reaches
each shard through one multi-host DSN with ``target_session_attrs=read-write`` and NATS through
the list of all three servers, so no Tally process needs to know who leads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tally_dev.engines import HOST, Engine, free_port
from tally_dev.ha import (
    EtcdEngine,
    NatsClusterNode,
    PatroniNode,
    multi_host_dsn,
    patroni_members,
    shard_secrets,
    wait_until,
)

Start = Callable[[str, Engine, float], None]  # name, engine, timeout: starts it and records it

NODE_SUFFIXES = ("a", "b")


def etcd_members(root: Path, count: int) -> list[EtcdEngine]:
    peers = {f"etcd-{i}": free_port() for i in range(count)}
    return [EtcdEngine(root / name, name, peers) for name in peers]


def shard_nodes(root: Path, db: int, etcd_hosts: list[str], synchronous: bool
                ) -> list[PatroniNode]:
    passwords = shard_secrets(root / f"pg{db}")
    return [PatroniNode(root / f"pg{db}-{s}", f"tally-pg{db}", f"pg{db}-{s}", etcd_hosts,
                        passwords, synchronous) for s in NODE_SUFFIXES]


def nats_nodes(root: Path, count: int) -> list[NatsClusterNode]:
    cluster_ports = [free_port() for _ in range(count)]
    return [NatsClusterNode(root / f"nats-{i}", f"nats-{i}", cluster_ports[i], cluster_ports)
            for i in range(count)]


def start_ha_engines(root: Path, databases: int, etcd_count: int, nats_count: int,
                     synchronous: bool, start: Start) -> dict[str, Any]:
    """Start every HA engine under ``root``; returns the settings Tally needs to reach them."""
    etcds = etcd_members(root, etcd_count)
    for e in etcds:  # each waits for the others before it answers: start all, then wait
        start(e.member, e, 60)
    wait_until("an etcd quorum", lambda: all(e.healthy() for e in etcds), 60)
    hosts = [f"{HOST}:{e.port}" for e in etcds]
    dsns = []
    for db in range(databases):
        nodes = shard_nodes(root, db, hosts, synchronous)
        start(nodes[0].member, nodes[0], 120)  # bootstraps, becomes the primary
        if nodes[0].psql("SELECT 1 FROM pg_database WHERE datname = 'tally'").strip() != "1":
            nodes[0].psql("CREATE DATABASE tally")
        for standby in nodes[1:]:
            start(standby.member, standby, 180)  # pg_basebackup, then streams
        if synchronous:
            api = [f"http://{HOST}:{n.port}" for n in nodes]
            wait_until(f"a synchronous standby of pg{db}", lambda api=api: any(
                m.get("role") == "sync_standby" for m in patroni_members(api)), 60)
        dsns.append(multi_host_dsn(nodes, "tally"))
    nats = nats_nodes(root, nats_count)
    for n in nats:
        start(n.member, n, 60)
    wait_until("a JetStream meta leader", lambda: all(n.healthy() for n in nats), 60)
    return {"postgres_dsns": dsns, "nats_url": ",".join(n.url for n in nats),
            "nats_replicas": min(3, len(nats))}


def entry_extra(engine: Engine) -> dict[str, Any]:
    """What the state file keeps about an HA engine beyond its pid: enough for status and kill."""
    if isinstance(engine, PatroniNode):
        return {"kind": "patroni", "api": f"http://{HOST}:{engine.port}",
                "pgdata": str(engine.data), "scope": engine.scope}
    if isinstance(engine, NatsClusterNode):
        return {"kind": "nats", "monitor": f"http://{HOST}:{engine.monitor_port}"}
    if isinstance(engine, EtcdEngine):
        return {"kind": "etcd"}
    return {}


def postmaster_pid(entry: dict[str, Any]) -> int | None:
    try:
        return int((Path(entry["pgdata"]) / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError, KeyError):
        return None


def roles(state: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per state name: PostgreSQL role and replication lag (as Patroni reports it), NATS stream
    leaders (as the first answering server reports them)."""
    out: dict[str, dict[str, Any]] = {}
    scopes: dict[str, list[str]] = {}
    for entry in state.values():
        if entry.get("kind") == "patroni":
            scopes.setdefault(entry["scope"], []).append(entry["api"])
    for apis in scopes.values():
        for m in patroni_members(apis):
            role = {"leader": "primary", "sync_standby": "sync standby",
                    "replica": "standby"}.get(m.get("role", ""), m.get("role", "?"))
            out[m["name"]] = {"pg_role": role, "state": m.get("state"),
                              "lag_bytes": m.get("lag", 0) if role != "primary" else 0,
                              "timeline": m.get("timeline")}
    leaders: dict[str, str] = {}
    for entry in state.values():
        if entry.get("kind") == "nats" and not leaders:
            leaders = _stream_leaders(entry["monitor"])
    for name, entry in state.items():
        if entry.get("kind") == "nats":
            led = sorted(s for s, leader in leaders.items() if leader == name)
            out[name] = {"role": "stream leader" if led else "follower", "leads": led}
    return out


def _stream_leaders(monitor: str) -> dict[str, str]:
    from tally_dev.ha import http_json

    try:
        status, body = http_json(f"{monitor}/jsz?accounts=true&streams=true", 1.0)
    except OSError:
        return {}
    out: dict[str, str] = {}
    for account in (body or {}).get("account_details", []) if status == 200 else []:
        for stream in account.get("stream_detail") or []:
            out[stream["name"]] = (stream.get("cluster") or {}).get("leader", "?")
    return out
