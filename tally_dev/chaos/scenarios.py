"""Chaos scenarios on the HA dev cluster, each under the client ledger's load.

A scenario injects its fault with the same verbs as ``tally cluster kill | wipe | restart``,
waits for the engines' own failover, repairs what a person or an orchestrator would (restart
the dead process), then lets the load run on. Afterwards every acknowledged state is read back
and the counts are compared with the ledger's recount (and the server's own recount).

Nothing here decides a failover: the scenario only kills, and watches Patroni and NATS report.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tally_dev.chaos.ledger import Ledger
from tally_dev.cluster import DevCluster
from tally_dev.engines import EngineError
from tally_dev.ha import http_json
from tally_dev.ha_cluster import roles


def primary_of(dev: DevCluster, db: int) -> str:
    found = [n for n, r in roles(dev._state()).items()
             if n.startswith(f"pg{db}-") and r.get("pg_role") == "primary"]
    if len(found) != 1:
        raise EngineError(f"shard pg{db} has primaries {found}")
    return found[0]


def shard_healthy(dev: DevCluster, db: int, synchronous: bool = True) -> bool:
    """Both members streaming under a primary (and one of them the synchronous standby)."""
    members = {n: r for n, r in roles(dev._state()).items() if n.startswith(f"pg{db}-")}
    kinds = sorted(r.get("pg_role", "") for r in members.values())
    states_ok = all(r.get("state") in ("running", "streaming") for r in members.values())
    want = ["primary", "sync standby"] if synchronous else ["primary", "standby"]
    return states_ok and kinds == want


async def wait_for(what: str, check: Callable[[], bool], timeout_s: float) -> float:
    """Seconds until ``check()`` held (polled off the event loop, which carries the load)."""
    started = time.monotonic()
    while not await asyncio.to_thread(check):
        if time.monotonic() - started > timeout_s:
            raise EngineError(f"{what}: not within {timeout_s:.0f} s")
        await asyncio.sleep(0.2)
    return time.monotonic() - started


def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return asyncio.to_thread(fn, *args)


# -- the faults: each returns what it observed ------------------------------------------------


async def pg_primary(dev: DevCluster) -> dict[str, Any]:
    """SIGKILL shard 0's primary PostgreSQL server; Patroni promotes the synchronous standby."""
    old = primary_of(dev, 0)
    await _in_thread(dev.kill, f"{old}.postgres")
    promoted = await wait_for("a new primary", lambda: _new_primary(dev, old), 60)
    healed = await wait_for("the old primary back as a standby", lambda: shard_healthy(dev, 0),
                            120)
    return {"killed": f"{old}.postgres", "promoted_after_s": round(promoted, 2),
            "standby_back_after_s": round(promoted + healed, 2)}


async def pg_primary_wiped(dev: DevCluster) -> dict[str, Any]:
    """SIGKILL shard 0's primary server (its Patroni promotes the standby), then its Patroni,
    delete its data directory and start it: it comes back as a new standby cloned from the
    promoted one. (Killing both at once is ``pg-node``.)"""
    old = primary_of(dev, 0)
    await _in_thread(dev.kill, f"{old}.postgres")
    promoted = await wait_for("a new primary", lambda: _new_primary(dev, old), 60)
    await _in_thread(dev.kill, old)
    await _in_thread(dev.wipe, old)
    started = time.monotonic()
    await _in_thread(dev.restart, old)
    await wait_for("the wiped node back as a standby", lambda: shard_healthy(dev, 0), 180)
    return {"killed": old, "wiped": old, "promoted_after_s": round(promoted, 2),
            "reclone_s": round(time.monotonic() - started, 2)}


async def pg_node(dev: DevCluster) -> dict[str, Any]:
    """SIGKILL shard 0's whole primary node (Patroni and PostgreSQL: a machine crash): the leader
    key must expire (ttl) before the standby may promote."""
    old = primary_of(dev, 0)
    await _in_thread(dev.kill, old)
    promoted = await wait_for("a new primary", lambda: _new_primary(dev, old), 90)
    await _in_thread(dev.restart, old)
    await wait_for("the old node back as a standby", lambda: shard_healthy(dev, 0), 120)
    return {"killed": old, "promoted_after_s": round(promoted, 2)}


async def nats_node(dev: DevCluster) -> dict[str, Any]:
    """SIGKILL the NATS server leading the event-log stream; restart it 10 s later."""
    leaders = [n for n, r in roles(dev._state()).items() if r.get("leads")]
    victim = leaders[0] if leaders else "nats-0"
    await _in_thread(dev.kill, victim)
    await asyncio.sleep(10)
    await _in_thread(dev.restart, victim)
    return {"killed": victim}


async def relay_and_aggregator(dev: DevCluster) -> dict[str, Any]:
    """SIGKILL the relay and one aggregator at once; restart both 10 s later."""
    await _in_thread(dev.kill, "relay-0")
    await _in_thread(dev.kill, "aggregator-0")
    await asyncio.sleep(10)
    await _in_thread(dev.restart, "relay-0")
    await _in_thread(dev.restart, "aggregator-0")
    return {"killed": "relay-0, aggregator-0"}


async def etcd_leader(dev: DevCluster) -> dict[str, Any]:
    """SIGKILL the etcd member shard 0's primary Patroni talks to (it says which in its log),
    else the Raft leader; restart it 10 s later. Two members keep the quorum, and Patroni moves
    to another member within its retry_timeout, so the primary keeps its leader key."""
    primary = primary_of(dev, 0)
    victim = await _in_thread(etcd_used_by, dev, primary) or await _in_thread(etcd_raft_leader,
                                                                              dev)
    await _in_thread(dev.kill, victim)
    await asyncio.sleep(10)
    still = primary_of(dev, 0)
    await _in_thread(dev.restart, victim)
    return {"killed": victim, "primary_kept": still == primary}


def etcd_used_by(dev: DevCluster, node: str) -> str | None:
    """The etcd member a Patroni node last selected (its log's "Selected new etcd server")."""
    state = dev._state()
    try:
        lines = Path(state[node]["log"]).read_text(errors="replace").splitlines()
    except OSError:
        return None
    chosen = [ln.rsplit(" ", 1)[-1] for ln in lines if "Selected new etcd server" in ln]
    for name, entry in state.items():
        if entry.get("kind") == "etcd" and chosen and entry["url"] == chosen[-1]:
            return name
    return None


def etcd_raft_leader(dev: DevCluster) -> str:
    import json
    import urllib.request

    names = {}
    leader = None
    for name, entry in dev._state().items():
        if entry.get("kind") != "etcd":
            continue
        req = urllib.request.Request(f"{entry['url']}/v3/maintenance/status", data=b"{}",
                                     method="POST")
        with urllib.request.urlopen(req, timeout=2) as resp:
            body = json.loads(resp.read())
        names[body["header"]["member_id"]] = name
        leader = body["leader"]
    if leader not in names:
        raise EngineError("no etcd leader found")
    return names[leader]


def _new_primary(dev: DevCluster, old: str) -> bool:
    try:
        now = primary_of(dev, 0)
    except EngineError:
        return False
    if now == old:
        return False
    try:
        return http_json(f"{dev._state()[now]['api']}/primary", 1.0)[0] == 200
    except OSError:
        return False


@dataclass(frozen=True)
class Scenario:
    name: str
    fault: Callable[[DevCluster], Any]
    summary: str


SCENARIOS = {s.name: s for s in (
    Scenario("pg-primary", pg_primary, "SIGKILL shard 0's primary PostgreSQL server"),
    Scenario("pg-primary-wiped", pg_primary_wiped,
             "SIGKILL shard 0's primary node and delete its data directory"),
    Scenario("pg-node", pg_node, "SIGKILL shard 0's primary node (Patroni + PostgreSQL)"),
    Scenario("nats-node", nats_node, "SIGKILL the NATS server leading the stream"),
    Scenario("relay-aggregator", relay_and_aggregator, "SIGKILL relay-0 and aggregator-0"),
    Scenario("etcd-leader", etcd_leader,
             "SIGKILL the etcd member shard 0's primary Patroni talks to"),
)}


async def run(dev: DevCluster, scenario: Scenario, warmup_s: float = 4.0,
              after_s: float = 5.0, ledger: Ledger | None = None,
              item_base: int = 0) -> dict[str, Any]:
    """Load, fault, repair, more load, then verify: one row of docs/reliability.md.

    Scenarios run one after another on one cluster each write items of their own
    (``item_base``), so every ledger starts from items nobody liked yet."""
    ledger = ledger or Ledger(dev.urls("api"), item_base=item_base)
    tasks = ledger.start()
    try:
        await asyncio.sleep(warmup_s)
        before = ledger.acked
        fault_at = time.monotonic()
        observed = await scenario.fault(dev)
        fault_s = time.monotonic() - fault_at
        await asyncio.sleep(after_s)
    finally:
        await ledger.stop(tasks)
    result = await ledger.verify(dev.urls("api")[0])
    return {"scenario": scenario.name, "fault": scenario.summary, **observed,
            "acked_before_fault": before, "fault_and_repair_s": round(fault_s, 2), **result}
