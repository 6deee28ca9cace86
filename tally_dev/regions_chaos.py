"""Proof of the regions under load, with a client ledger: ``python -m tally_dev.regions_chaos``
(``make chaos-regions``); ``tests/regions/test_regions_e2e.py`` runs a short case.

Clients own (user, item) pairs and write each pair sequentially through either region's API (so
about half the writes are forwarded to the user's home); a request that fails is retried until
acknowledged, so the ledger's last acknowledged state of each pair is exact. The run:

1. load, while a probe likes fresh items at their user's home and times their arrival in the
   other region (cross-region visibility delay), and the ops' latency is kept direct vs forwarded;
2. partition us|eu under load: reads keep answering in both; the writes only the home region
   can take wait for the heal; after it, both regions converge to the ledger with no repair;
3. us SIGKILLed under load and restarted (no failover): what eu lacked at the kill is async
   mode's loss window (likes and seconds), and all of it is there after the restart;
4. a staged conflict and a late like (made at us while it is cut off), then us is SIGKILLed
   (engines included), failed over to eu under load (eu's reads polled throughout), the
   at-risk likes measured, us recovered and rejoined: both regions equal the ledger, and the
   conflict is listed.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tally.core.regions import hash_home
from tally_dev.regions import RegionCluster

Pair = tuple[str, int]


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(int(q * len(values)), len(values) - 1)] if values else float("nan")


@dataclass
class Ledger:
    rc: RegionCluster
    users: int
    items: int
    state: dict[Pair, bool] = field(default_factory=dict)
    acked_at: dict[Pair, float] = field(default_factory=dict)
    # When the request that was acknowledged was sent: a region lost at t may have decided
    # every write sent before t, though its answer is read (and ``acked_at`` stamped) later.
    sent_at: dict[Pair, float] = field(default_factory=dict)
    latency: dict[str, list[float]] = field(default_factory=lambda: {"direct": [], "forwarded": []})
    pending: dict[Pair, bool] = field(default_factory=dict)  # unknown outcome, settled later
    retries: int = 0
    read_failures: dict[str, int] = field(default_factory=dict)
    reads: int = 0
    stop: bool = False

    def home(self, user: str) -> str:
        return hash_home(user, tuple(sorted(self.rc.regions)))

    async def write(self, http: httpx.AsyncClient, pair: Pair, on: bool,
                    region: str | None = None, deadline_s: float = 120.0,
                    settling: bool = False) -> None:
        user, item = pair
        body = {"user_id": user, "item_type": "post", "item_id": item}
        t_end = time.monotonic() + deadline_s
        while True:
            at = region or random.choice(self.rc.regions)
            t0, sent = time.perf_counter(), time.time()
            try:
                r = await http.post(f"{self.rc.api(at)}/v1/{'like' if on else 'unlike'}",
                                    json=body, timeout=5.0)
                if r.status_code == 200:
                    kind = "direct" if self.home(user) == at else "forwarded"
                    self.latency[kind].append(time.perf_counter() - t0)
                    self.state[pair] = on
                    self.acked_at[pair], self.sent_at[pair] = time.time(), sent
                    return
            except httpx.TransportError:
                pass
            self.retries += 1
            if time.monotonic() > t_end:
                raise AssertionError(f"{pair} never acknowledged")
            if self.stop and region is None and not settling:  # stopping: settle it later
                self.pending[pair] = on
                return
            await asyncio.sleep(0.05)

    async def settle(self) -> None:
        """Retry the writes whose outcome was unknown until acknowledged (idempotent)."""
        async with httpx.AsyncClient(headers=self.rc.headers()) as http:
            for pair, on in list(self.pending.items()):
                # Until acknowledged: a first attempt at a dead region must not drop the write
                # (its first attempt may have been decided there before the kill).
                await self.write(http, pair, on, deadline_s=60.0, settling=True)
                del self.pending[pair]

    async def at_risk(self, region: str, home: str, before: float) -> list[float]:
        """Ack times of the pairs homed at ``home`` whose acknowledged state ``region`` does
        not hold: what a loss of ``home`` at ``before`` would take with it, in async mode
        (requests sent before it: ``home`` may have decided them, whenever their answer was
        read)."""
        by_user: dict[str, list[int]] = {}
        for (user, item) in self.state:
            if self.home(user) == home and (user, item) not in self.pending:
                by_user.setdefault(user, []).append(item)
        out = []
        async with httpx.AsyncClient(headers=self.rc.headers()) as http:
            for user, items in by_user.items():
                r = await http.post(f"{self.rc.api(region)}/v1/has", json={
                    "user_id": user, "items": [{"item_type": "post", "item_id": i}
                                               for i in items]}, timeout=5.0)
                for i, res in zip(items, r.json()["results"], strict=True):
                    if res["on"] != self.state[(user, i)] and self.sent_at[(user, i)] < before:
                        out.append(self.acked_at[(user, i)])
        return out

    async def client(self, n: int, clients: int, items: range) -> None:
        rng = random.Random(n)
        mine = [(f"u{u}", i) for u in range(self.users) for i in items
                if (u * 7919 + i) % clients == n]
        async with httpx.AsyncClient(headers=self.rc.headers()) as http:
            while not self.stop:
                pair = rng.choice(mine)
                await self.write(http, pair, not self.state.get(pair, False))

    async def reader(self, region: str, items: range) -> None:
        """Reads in one region: must keep answering whatever happens to the others."""
        async with httpx.AsyncClient(headers=self.rc.headers()) as http:
            while not self.stop:
                try:
                    r = await http.post(f"{self.rc.api(region)}/v1/counts", json={
                        "items": [{"item_type": "post", "item_id": i} for i in items][:50]}, timeout=2.0)
                    self.reads += 1
                    ok = r.status_code == 200
                except httpx.TransportError:
                    ok = False
                if not ok:
                    self.read_failures[region] = self.read_failures.get(region, 0) + 1
                await asyncio.sleep(0.05)

    def expected(self, items: range) -> dict[int, int]:
        out = dict.fromkeys(items, 0)
        for (_user, item), on in self.state.items():
            out[item] = out.get(item, 0) + on
        return out

    async def counts(self, region: str, items: range) -> dict[int, int]:
        async with httpx.AsyncClient(headers=self.rc.headers()) as http:
            out: dict[int, int] = {}
            ids = list(items)
            for k in range(0, len(ids), 200):
                r = await http.post(f"{self.rc.api(region)}/v1/counts", json={
                    "items": [{"item_type": "post", "item_id": i} for i in ids[k:k + 200]],
                    "counters": ["like"]},
                    timeout=10.0)
                r.raise_for_status()
                for i, entry in zip(ids[k:k + 200], r.json()["results"], strict=True):
                    out[i] = entry["counts"]["like"]
            return out


async def visibility(rc: RegionCluster, samples: int, base_item: int
                     ) -> dict[str, list[float]]:
    """Like a fresh item at its user's home; time until the other region's records hold it
    (``/v1/has`` reads the like records, no cache: replicated and applied) and until its count
    answers 1 (what a reader there sees, through the API's caches)."""
    out: dict[str, list[float]] = {"records": [], "count": []}
    async with httpx.AsyncClient(headers=rc.headers()) as http:
        for k in range(samples):
            user, item = f"probe{k}", base_item + k
            home = hash_home(user, tuple(sorted(rc.regions)))
            other = rc.api(next(r for r in rc.regions if r != home))
            await http.post(f"{rc.api(home)}/v1/like", json={
                "user_id": user, "item_type": "post", "item_id": item}, timeout=5.0)
            t0 = time.perf_counter()
            seen: dict[str, float] = {}
            while len(seen) < 2 and time.perf_counter() - t0 < 15:
                if "records" not in seen:
                    r = await http.get(f"{other}/v1/has/like/{user}/post/{item}", timeout=2.0)
                    if r.json()["on"]:
                        seen["records"] = time.perf_counter() - t0
                if "count" not in seen:
                    r = await http.get(f"{other}/v1/items/post/{item}/counts", timeout=2.0)
                    if r.json()["counts"]["like"] == 1:
                        seen["count"] = time.perf_counter() - t0
                await asyncio.sleep(0.01)
            for kind, delay in seen.items():
                out[kind].append(delay)
            await asyncio.sleep(0.2)
    return out


async def mismatches(ledger: Ledger, items: range, settle_s: float = 5.0
                     ) -> dict[str, dict[int, tuple[int, int]]]:
    """Counts that differ from the ledger, read through each region's API; read again for up to
    ``settle_s``: an API serves a hot item from memory for ``hot_ttl_s`` (0.25 s) after the count
    store has it."""
    want = ledger.expected(items)
    out: dict[str, dict[int, tuple[int, int]]] = {}
    deadline = time.monotonic() + settle_s
    for region in ledger.rc.regions:
        while True:
            got = await ledger.counts(region, items)
            out[region] = {i: (got[i], want[i]) for i in items if got[i] != want[i]}
            if not out[region] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
    return out


async def run(rc: RegionCluster, users: int = 120, items: int = 24, clients: int = 6,
              phase_s: float = 5.0, probes: int = 20) -> dict[str, Any]:
    """The three phases; returns the measurements and every mismatch found (empty: correct)."""
    out: dict[str, Any] = {}
    load_items = range(items)
    led = Ledger(rc, users, items)

    async def load(seconds: float, extra: list[asyncio.Task[Any]] | None = None) -> None:
        led.stop = False
        tasks = [asyncio.create_task(led.client(n, clients, load_items)) for n in range(clients)]
        tasks += [asyncio.create_task(led.reader(r, load_items)) for r in rc.regions]
        await asyncio.sleep(seconds)
        led.stop = True
        await asyncio.gather(*tasks, *(extra or []))

    # 1. load + visibility probe (after one like has crossed: sourcing starts in seconds)
    await visibility(rc, 1, 9_999)
    probe = asyncio.create_task(visibility(rc, probes, 10_000))
    await load(phase_s, [probe])
    out["visibility_ms"] = {kind: {"n": len(d), "p50": 1000 * pct(d, 0.5),
                                   "p99": 1000 * pct(d, 0.99), "max": 1000 * max(d, default=0)}
                            for kind, d in probe.result().items()}
    # 2. partition under load, heal, converge without repair
    rc.partition("us", "eu")
    t_cut = time.monotonic()
    load_task = asyncio.create_task(load(phase_s))
    await asyncio.sleep(phase_s)
    rc.heal()
    await load_task
    out["partition_s"] = time.monotonic() - t_cut
    await led.settle()
    out["converge_after_heal_s"] = await asyncio.to_thread(rc.wait_converged, 120.0, False)
    out["after_heal"] = await mismatches(led, load_items)
    out["read_failures_through_partition"] = dict(led.read_failures)
    # 3a. async mode's window: us SIGKILLed under load, no failover: what eu lacks then is what
    # a permanent loss of us would lose; us restarted with its data, nothing is lost
    load_task = asyncio.create_task(load(phase_s))
    await asyncio.sleep(phase_s / 2)
    t_kill = time.time()
    await asyncio.to_thread(rc.fail, "us")  # the clients go on reading their answers
    t_dead = time.time()
    await load_task
    risky = await led.at_risk("eu", "us", t_dead)
    out["async_kill"] = {"at_risk_likes": len(risky),
                         "window_s": t_kill - min(risky) if risky else 0.0}
    await asyncio.to_thread(rc.recover, "us")
    await led.settle()
    await asyncio.to_thread(rc.wait_converged, 120.0, False)
    out["after_async_kill"] = await mismatches(led, load_items)
    # 3b. a late like and a staged conflict at us while it is cut off; kill; failover; rejoin
    us_users = [f"u{u}" for u in range(users) if led.home(f"u{u}") == "us"]
    conflict_pair, late_pair = (us_users[0], 900), (us_users[1], 901)
    async with httpx.AsyncClient(headers=rc.headers()) as http:
        await led.write(http, conflict_pair, True, "us")
        await asyncio.to_thread(rc.wait_converged, 60.0, False)
        rc.partition("us", "eu")
        await led.write(http, conflict_pair, False, "us")  # eu never hears of it
        await led.write(http, late_pair, True, "us")
        t_kill = time.time()
        out["killed"] = rc.fail("us")
        rc.heal()
        t0 = time.monotonic()
        led.stop = False
        readers = [asyncio.create_task(led.reader("eu", load_items))]
        out["failover_epoch"] = await asyncio.to_thread(rc.failover, "us", "eu")
        await led.write(http, (us_users[2], 902), True, "eu")
        out["failover_to_first_write_s"] = time.monotonic() - t0
        r = await http.post(f"{rc.api('eu')}/v1/has", json={
            "user_id": late_pair[0], "counter": "like",
            "items": [{"item_type": "post", "item_id": late_pair[1]}]})
        out["at_risk_likes"] = int(not r.json()["results"][0]["on"])
        out["at_risk_window_s"] = t_kill - led.acked_at[late_pair]
        await led.write(http, conflict_pair, False, "eu")  # epoch 2 decides: off, then on
        await led.write(http, conflict_pair, True, "eu")
        led.stop = True
        await asyncio.gather(*readers)
    fresh = range(900, 903)
    t0 = time.monotonic()
    report = await asyncio.to_thread(rc.recover, "us")
    out["recover_rejoin_s"] = time.monotonic() - t0
    out["rejoin"] = {"late": report.late, "applied": report.applied, "agreed": report.agreed,
                     "conflicts": [(c.user, c.item) for c in report.conflicts]}
    out["after_rejoin"] = await mismatches(led, load_items)
    out["after_rejoin_fresh"] = await mismatches(led, fresh)
    out["reads"], out["read_failures"] = led.reads, led.read_failures
    out["eu_read_failures_us_dead"] = led.read_failures.get("eu", 0)  # over the whole run
    out["write_retries"] = led.retries
    out["latency_ms"] = {k: {"n": len(v), "p50": 1000 * statistics.median(v),
                             "p99": 1000 * pct(v, 0.99)} for k, v in led.latency.items() if v}
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m tally_dev.regions_chaos")
    p.add_argument("--dir", default="/tmp/tally-regions-chaos")
    p.add_argument("--phase-s", type=float, default=20.0)
    p.add_argument("--users", type=int, default=400)
    p.add_argument("--probes", type=int, default=100)
    p.add_argument("--out", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    rc = RegionCluster(Path(args.dir), partitions=8)
    rc.up(2, net=8)
    try:
        out = asyncio.run(run(rc, users=args.users, items=60, clients=8, phase_s=args.phase_s,
                              probes=args.probes))
    finally:
        rc.down()
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    bad = [k for k in ("after_heal", "after_async_kill", "after_rejoin", "after_rejoin_fresh")
           if any(out[k].values())]
    return 1 if bad or out["eu_read_failures_us_dead"] else 0


if __name__ == "__main__":
    sys.exit(main())
