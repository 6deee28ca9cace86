"""Proof of ``replication = "sync"`` with a client ledger: ``python -m tally_dev.regions_sync``
(in ``make chaos-regions``); ``tests/regions/test_regions_sync.py`` runs a short case.

Two regions (or three: ``--regions 3``, the leaf-node hub in the witness place), ``like``
synchronous and ``save`` asynchronous, so both modes take the same load,
the same kill and the same failover in one run. Clients own (user, item, counter) triples and
write each sequentially through either region's API, retrying until acknowledged, so the
ledger's last acknowledged state of each triple is exact. The run:

1. load: latency of each op, per counter (sync like vs async save), direct vs forwarded;
2. us cut from every peer (and from the hub outside the regions, if any): a like at us is
   refused (503 with Retry-After: no peer holds it), a save at us is taken; after the heal the
   like is taken;
3. load again, and us is SIGKILLed in the middle of it with its disks lost (data directories
   deleted); ``tally region failover us --to eu``;
4. every acknowledged state of every triple (outcome known) is read back at eu from its records:
   likes lost must be none; saves lost are listed with their age at the kill (async's window);
5. the writes whose outcome was unknown are retried (now at eu), eu's counts are compared with a
   recount (``reconcile``, drifts listed) and with the ledger, less the listed losses.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
from nats.errors import NoRespondersError
from nats.js.errors import NoStreamResponseError

from tally import regions_admin
from tally.core.regions import hash_home
from tally.settings import load
from tally.store.jetstream.synchold import hold_subject, holding_stream
from tally_dev.regions import WITNESS, RegionCluster
from tally_dev.regions_chaos import pct, visibility

SYNC, ASYNC = "like", "save"
CUT_ITEM = 990  # the item written while the regions are cut
Triple = tuple[str, int, str]  # user, item, counter


@dataclass
class SyncLedger:
    rc: RegionCluster
    users: int
    items: int
    state: dict[Triple, bool] = field(default_factory=dict)
    acked_at: dict[Triple, float] = field(default_factory=dict)
    latency: dict[str, list[float]] = field(default_factory=dict)  # "like direct": [...]
    pending: dict[Triple, bool] = field(default_factory=dict)  # unknown outcome, settled later
    refused: int = 0  # 503 answers (a sync write no peer held in time), retried
    stop: bool = False

    def home(self, user: str) -> str:
        return hash_home(user, tuple(sorted(self.rc.regions)))

    async def send(self, http: httpx.AsyncClient, t: Triple, on: bool, region: str
                   ) -> httpx.Response:
        user, item, counter = t
        return await http.post(
            f"{self.rc.api(region)}/v1/counters/{counter}/{'set' if on else 'clear'}",
            json={"user_id": user, "item_type": "post", "item_id": item}, timeout=5.0)

    async def write(self, http: httpx.AsyncClient, t: Triple, on: bool,
                    region: str | None = None, deadline_s: float = 120.0) -> None:
        t_end = time.monotonic() + deadline_s
        while True:
            at = region or random.choice(self.rc.regions)
            t0 = time.perf_counter()
            try:
                r = await self.send(http, t, on, at)
                if r.status_code == 200:
                    kind = "direct" if self.home(t[0]) == at else "forwarded"
                    self.latency.setdefault(f"{t[2]} {kind}", []).append(
                        time.perf_counter() - t0)
                    self.state[t] = on
                    self.acked_at[t] = time.time()
                    return
                self.refused += r.status_code == 503
            except httpx.TransportError:
                pass
            if time.monotonic() > t_end:
                raise AssertionError(f"{t} never acknowledged")
            if self.stop and region is None:  # a load client stopping: settle it later
                self.pending[t] = on
                return
            await asyncio.sleep(0.05)

    async def client(self, n: int, clients: int) -> None:
        rng = random.Random(n)
        mine = [(f"u{u}", i, c) for u in range(self.users) for i in range(self.items)
                for c in (SYNC, ASYNC) if (u * 7919 + i) % clients == n]
        async with httpx.AsyncClient(headers=self.rc.headers()) as http:
            while not self.stop:
                t = rng.choice(mine)
                if t not in self.pending:
                    await self.write(http, t, not self.state.get(t, False))

    async def settle(self) -> None:
        self.stop = False  # the load has stopped: these retry until acknowledged
        async with httpx.AsyncClient(headers=self.rc.headers()) as http:
            for t, on in list(self.pending.items()):
                await self.write(http, t, on, deadline_s=60.0)
                del self.pending[t]

    async def lost(self, region: str, t_kill: float) -> dict[str, list[dict[str, Any]]]:
        """Per counter, the acknowledged states (outcome known) ``region``'s records lack, each
        with its user, item, state and age at the kill."""
        out: dict[str, list[dict[str, Any]]] = {SYNC: [], ASYNC: []}
        by_key: dict[tuple[str, str], list[int]] = {}
        for (user, item, counter) in self.state:
            if (user, item, counter) not in self.pending:
                by_key.setdefault((user, counter), []).append(item)
        async with httpx.AsyncClient(headers=self.rc.headers()) as http:
            for (user, counter), items in by_key.items():
                r = await http.post(f"{self.rc.api(region)}/v1/has", json={
                    "user_id": user, "counter": counter,
                    "items": [{"item_type": "post", "item_id": i} for i in items]}, timeout=5.0)
                r.raise_for_status()
                for i, res in zip(items, r.json()["results"], strict=True):
                    want = self.state[(user, i, counter)]
                    if res["on"] != want:
                        out[counter].append({"user": user, "item": i, "state": want,
                                             "acked_before_kill_s": round(
                                                 t_kill - self.acked_at[(user, i, counter)], 3)})
        return out

    def item_ids(self) -> list[int]:
        return [*range(self.items), CUT_ITEM, CUT_ITEM + 1]

    def expected(self, counter: str) -> dict[int, int]:
        out = dict.fromkeys(self.item_ids(), 0)
        for (_u, item, c), on in self.state.items():
            if c == counter:
                out[item] += on
        return out

    async def counts(self, region: str) -> dict[str, dict[int, int]]:
        async with httpx.AsyncClient(headers=self.rc.headers()) as http:
            r = await http.post(f"{self.rc.api(region)}/v1/counts", json={
                "items": [{"item_type": "post", "item_id": i} for i in self.item_ids()],
                "counters": [SYNC, ASYNC]}, timeout=10.0)
            r.raise_for_status()
            res = r.json()["results"]
            return {c: {i: e["counts"][c] for i, e in zip(self.item_ids(), res, strict=True)}
                    for c in (SYNC, ASYNC)}


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": round(1000 * statistics.median(values), 1),
            "p99_ms": round(1000 * pct(values, 0.99), 1)} if values else {"n": 0}


async def refused_while_cut(rc: RegionCluster, led: SyncLedger) -> dict[str, Any]:
    """A sync like at us while us is cut from every peer is refused (503, Retry-After); a save
    is taken. The cut includes the leaf-node hub when it is no region: the holding streams are
    reached through it."""
    user = next(f"u{u}" for u in range(led.users) if led.home(f"u{u}") == "us")
    out: dict[str, Any] = {}
    for other in [r for r in rc.regions if r != "us"] + ([WITNESS] if rc.hub == WITNESS else []):
        rc.partition("us", other)
    try:
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(headers=rc.headers()) as http:
            for counter in (SYNC, ASYNC):
                t = (user, CUT_ITEM, counter)
                t0 = time.perf_counter()
                r = await led.send(http, t, True, "us")
                out[counter] = {"status": r.status_code,
                                "retry_after": r.headers.get("retry-after"),
                                "answered_in_s": round(time.perf_counter() - t0, 2)}
                if r.status_code == 200:
                    led.state[t], led.acked_at[t] = True, time.time()
                else:
                    led.pending[t] = True  # committed at us, but not promised
    finally:
        rc.heal()
    await led.settle()
    return out


async def drifts(rc: RegionCluster, region: str, repair: bool) -> list[dict[str, Any]]:
    """Counts that differ from a recount of the region's records (repaired if asked)."""
    async with httpx.AsyncClient(headers=rc.headers(admin=True)) as http:
        r = await http.post(f"{rc.api(region)}/v1/admin/reconcile", json={"repair": repair},
                            timeout=120)
        r.raise_for_status()
        return [d for line in r.text.splitlines() if line for d in json.loads(line)["drifts"]]


async def hold_waits(rc: RegionCluster, regions: list[str]) -> dict[str, dict[str, float]]:
    """Per region, from its /metrics: synchronous toggles held, refused and acknowledged alone,
    and the mean wait for a peer's acknowledgement."""
    out: dict[str, dict[str, float]] = {}
    async with httpx.AsyncClient(headers=rc.headers(admin=True)) as http:
        for region in regions:
            text = (await http.get(f"{rc.api(region)}/metrics", timeout=5.0)).text
            got = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                   if line.startswith("tally_region_sync")}
            n = got.get("tally_region_sync_wait_seconds_count", 0.0)
            out[region] = {"held": got.get("tally_region_sync_held_ops_total", 0.0),
                           "refused": got.get("tally_region_sync_refused_ops_total", 0.0),
                           "alone": got.get("tally_region_sync_alone_ops_total", 0.0),
                           "mean_wait_ms": round(1000 * got.get(
                               "tally_region_sync_wait_seconds_sum", 0.0) / n, 1) if n else 0.0}
    return out


async def fenced(rc: RegionCluster, region: str, origin: str) -> bool:
    """Whether a synchronous publish of ``origin``'s, made at ``region``'s NATS (where it would
    arrive over the leaf link), finds no holding stream to acknowledge it: the failover's fence."""
    s = load(rc.config(region))
    nc = await nats.connect(s.nats_url)
    try:
        await nc.jetstream(timeout=2.0).publish(
            hold_subject(s.nats_stream, origin), b'{"origin": "probe", "states": []}',
            stream=holding_stream(s.nats_stream, origin))
        return False
    except (NoRespondersError, NoStreamResponseError):
        return True
    finally:
        await nc.close()


def _eu_drained(rc: RegionCluster, region: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if asyncio.run(regions_admin.progress(load(rc.config(region))))[1] == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"{region} did not drain in {timeout_s:.0f} s")


async def _stall(rc: RegionCluster, region: str, peer: str) -> None:
    """Stop ``region`` sourcing ``peer``'s log: replication lags as over a congested link."""
    async with regions_admin.RegionHandle(load(rc.config(region))) as h:
        await h.log.set_sources([p for p in await h.sourced() if p != peer])


async def run(rc: RegionCluster, users: int = 60, items: int = 12, clients: int = 4,
              phase_s: float = 4.0, stall_s: float = 1.0) -> dict[str, Any]:
    """The run above; ``rc`` is up with ``sync_counters=("like",)``. ``stall_s``: for that long
    before the kill, eu does not source us's log (a congested link), so the kill finds changes
    eu lacks whatever the machine's speed: async loses them, sync must not."""
    out: dict[str, Any] = {}
    led = SyncLedger(rc, users, items)

    async def load_for(seconds: float, during: Any = None) -> None:
        led.stop = False
        tasks = [asyncio.create_task(led.client(n, clients)) for n in range(clients)]
        if during is not None:
            await asyncio.sleep(seconds / 2)
            await during()
            await asyncio.sleep(seconds / 2)
        else:
            await asyncio.sleep(seconds)
        led.stop = True
        await asyncio.gather(*tasks)

    await visibility(rc, 1, 9_999)  # cross-domain sourcing starts a few seconds after creation
    await load_for(phase_s)
    out["latency"] = {k: summary(v) for k, v in sorted(led.latency.items())}
    out["hold_waits"] = await hold_waits(rc, rc.regions)
    out["us_sync_fenced_at_eu_before"] = await fenced(rc, "eu", "us")  # held there: acknowledged
    out["refused_while_cut"] = await refused_while_cut(rc, led)
    out["refused_503_during_load"] = led.refused
    kill: dict[str, Any] = {}

    async def lose_us() -> None:
        await _stall(rc, "eu", "us")
        await asyncio.sleep(stall_s)
        kill["t"] = time.time()  # in a thread: the clients go on stamping their answers
        kill["killed"] = await asyncio.to_thread(rc.fail, "us")
        kill["wiped"] = await asyncio.to_thread(rc.wipe, "us")

    await load_for(phase_s, lose_us)
    out["replication_stalled_s"] = stall_s
    out["at_risk_at_kill"] = await led.lost("eu", kill["t"])  # what eu lacks before failing over
    await asyncio.to_thread(_eu_drained, rc, "eu")
    out["drifts_before_failover"] = await drifts(rc, "eu", repair=False)
    t0 = time.monotonic()
    out["failover_epoch"] = await asyncio.to_thread(rc.failover, "us", "eu")
    out["failover_s"] = round(time.monotonic() - t0, 2)
    out["us_sync_fenced_at_eu"] = await fenced(rc, "eu", "us")
    user = next(f"u{u}" for u in range(users) if led.home(f"u{u}") == "us")
    async with httpx.AsyncClient(headers=rc.headers()) as http:  # us's users write again at eu
        await led.write(http, (user, CUT_ITEM + 1, SYNC), True, "eu", deadline_s=60.0)
    out["failover_to_first_like_s"] = round(time.monotonic() - t0, 2)
    out["killed"], out["wiped"] = kill["killed"], kill["wiped"]
    out["unknown_outcome_at_kill"] = len(led.pending)
    lost = await led.lost("eu", kill["t"])
    out["checked"] = {c: sum(1 for t in led.state if t[2] == c and t not in led.pending)
                      for c in (SYNC, ASYNC)}
    out["lost"] = lost
    out["async_window_s"] = max((x["acked_before_kill_s"] for x in lost[ASYNC]), default=0.0)
    await led.settle()
    await asyncio.to_thread(_eu_drained, rc, "eu")
    out["drifts_eu"] = await drifts(rc, "eu", repair=True)  # counts vs a recount
    # eu alone after the failover: its likes acknowledged without a peer, and counted as such
    out["hold_waits_eu_alone"] = (await hold_waits(rc, ["eu"]))["eu"]
    out["lost_after_settle"] = await led.lost("eu", kill["t"])
    got = await led.counts("eu")
    lost_saves: dict[int, int] = {}
    for x in lost[ASYNC]:  # a lost save that was on is one fewer; off, one more
        lost_saves[x["item"]] = lost_saves.get(x["item"], 0) + (1 if x["state"] else -1)
    out["after_failover"] = {
        c: {i: (got[c][i], want) for i, want in led.expected(c).items()
            if got[c][i] != want - (lost_saves.get(i, 0) if c == ASYNC else 0)}
        for c in (SYNC, ASYNC)}
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tally_dev.regions_sync")
    p.add_argument("--dir", default="/tmp/tally-regions-sync")
    p.add_argument("--phase-s", type=float, default=15.0)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--net", type=int, default=9, help="namespace net number (10.250.N.0/24)")
    p.add_argument("--regions", type=int, choices=(2, 3), default=2)
    p.add_argument("--out", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    rc = RegionCluster(Path(args.dir), partitions=8, sync_counters=(SYNC,))
    # Three regions: the hub outside them, so us's loss cuts no replication between eu and ap.
    rc.up(args.regions, net=args.net, hub=WITNESS if args.regions > 2 else "region")
    try:
        out = asyncio.run(run(rc, users=args.users, items=40, clients=8, phase_s=args.phase_s))
    finally:
        rc.down()
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    bad = out["lost"][SYNC] or any(out["after_failover"].values()) or out["drifts_eu"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
