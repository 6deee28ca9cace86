"""Automatic failover through the witness quorum, and three regions, under load with a client
ledger: ``python -m tally_dev.regions_failover`` (in ``make chaos-regions``);
``tests/regions/test_failover_e2e.py`` runs the short case.

``run_witness`` (two regions, an etcd member in each and a witness member in a namespace of its
own, leases of ``witness_ttl_s``):

1. no majority anywhere: the witness killed and us|eu cut. For longer than two leases nothing
   is failed over, and each region refuses its own users' toggles (503): it cannot tell whether
   the other side took them. Healed, both decide again, same epoch;
2. us cut from eu *and* the witness, under load: eu and the witness hold the majority and eu
   takes us's users over (measured: cut to new epoch, cut to the first acknowledged write of a
   us user at eu); us fences itself (measured: cut to its first 503). Staged meanwhile: a like
   acknowledged by us just after the cut, then unliked at eu (a no-op there: eu never got the
   like), and views counted at us and at eu. After the heal us learns the epoch by itself; the
   rejoin lists the late like as a conflict (the unlike wins), adds the late views once, and
   every count in both regions equals the ledger. Split brain is looked for in the logs: no
   (user, item) decided by two regions in one epoch;
3. us given its users back (``restore``), then SIGKILLed under load: eu takes over by itself
   (measured like 2.), the likes us acknowledged and eu lacks are counted, us is recovered and
   rejoined, counts equal the ledger.

``run_three`` (three regions, an etcd member in each, no witness needed): load; ap killed, failed
over automatically, recovered and rejoined; eu|ap cut under load and healed; us killed: whether
eu's likes still reach ap while it is down (they do with the leaf-node hub in the witness place,
``--leaf-hub witness``, the default here; not with the hub in us, ``--leaf-hub region``); with the
hub outside, the hub itself lost and back: replication waits for it, then resumes. Counts in all
three equal the ledger after each step that converges.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from tally.core.regions import Placement
from tally.regions_admin import RegionHandle
from tally.settings import load
from tally_dev.regions import WITNESS, RegionCluster
from tally_dev.regions_chaos import Ledger, mismatches

VIEW = "view"


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> float:
    """Seconds until ``check`` holds (polled every 0.1 s); raises after ``timeout_s``."""
    t0 = time.monotonic()
    while not await check():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        await asyncio.sleep(0.1)
    return time.monotonic() - t0


def _ready(rc: RegionCluster, region: str) -> dict[str, Any]:
    return rc.readiness(region)


async def _epoch(rc: RegionCluster, region: str) -> int:
    return int((await asyncio.to_thread(_ready, rc, region)).get("placement_epoch") or 0)


async def _views(rc: RegionCluster, http: httpx.AsyncClient, region: str, item: int) -> int:
    r = await http.get(f"{rc.api(region)}/v1/items/post/{item}/counts", timeout=5.0)
    r.raise_for_status()
    return int(r.json()["counts"].get(VIEW, 0))


async def _view(rc: RegionCluster, http: httpx.AsyncClient, region: str, item: int,
                key: str) -> None:
    """One view, acknowledged by ``region`` (retried there with the same key: counted once)."""
    for _ in range(100):
        try:
            r = await http.post(f"{rc.api(region)}/v1/counters/{VIEW}/incr", json={
                "item_type": "post", "item_id": item, "idempotency_key": key}, timeout=5.0)
            if r.status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"view {key} at {region} never acknowledged")


async def _status(rc: RegionCluster, http: httpx.AsyncClient, region: str, user: str,
                  item: int, led: Ledger) -> int:
    """A like of ``user`` sent to ``region`` once; an acknowledged one goes into the ledger."""
    try:
        r = await http.post(f"{rc.api(region)}/v1/like", json={
            "user_id": user, "item_type": "post", "item_id": item}, timeout=5.0)
    except httpx.TransportError:
        return 0
    if r.status_code == 200:
        led.state[(user, item)] = True
        led.acked_at[(user, item)] = led.sent_at[(user, item)] = time.time()
    return r.status_code


async def split_brain(rc: RegionCluster) -> dict[str, Any]:
    """Every decision each region's own log holds, put in the epoch in force at its time (the
    placement history of a serving region): the (user, item) pairs decided by two regions in one
    epoch (none: no split brain), and how many decisions were looked at."""
    cfgs = {r: load(rc.config(r)) for r in rc.regions}
    history: list[Placement] = []
    deciders: dict[tuple[int, str, str], set[str]] = {}
    n = 0
    for region, cfg in cfgs.items():
        try:
            async with RegionHandle(cfg) as h:
                if not history:
                    rows = await h.pg.cluster.fetch(0, "SELECT body FROM placement ORDER BY epoch")
                    history = [Placement.from_json(json.loads(r[0])) for r in rows]
                for p in range(cfg.log_partitions):
                    for ev in await h.log.origin_events(region, p):
                        if ev.user is None or ev.counter not in h.regions.toggles:
                            continue
                        epoch = max(pl.epoch for pl in history if pl.since <= ev.ts)
                        deciders.setdefault((epoch, ev.user, ev.item), set()).add(region)
                        n += 1
        except Exception as exc:  # a dead region's log cannot be read: say so
            return {"error": f"{region}: {exc!r}"}
    both = sorted(f"epoch {e}: {u} {i} by {sorted(rs)}" for (e, u, i), rs in deciders.items()
                  if len(rs) > 1)
    return {"decisions": n, "decided_by_two_in_one_epoch": both}


class Run:
    """One ledger with load helpers, shared by the phases."""

    def __init__(self, rc: RegionCluster, users: int, items: int, clients: int) -> None:
        self.rc = rc
        self.led = Ledger(rc, users, items)
        self.items = range(items)
        self.clients = clients
        self.users = [f"u{u}" for u in range(users)]
        self.pairs_off: dict[str, list[dict[str, Any]]] = {}  # region -> per check

    def homed(self, region: str) -> list[str]:
        return [u for u in self.users if self.led.home(u) == region]

    def start_load(self, readers: list[str] | None = None) -> asyncio.Task[None]:
        led = self.led
        led.stop = False
        tasks = [led.client(n, self.clients, self.items) for n in range(self.clients)]
        tasks += [led.reader(r, self.items) for r in (readers or [])]

        async def all_of() -> None:
            await asyncio.gather(*tasks)

        return asyncio.create_task(all_of())

    async def stop_load(self, task: asyncio.Task[None]) -> None:
        self.led.stop = True
        await task
        await self.led.settle()

    async def converged(self, extra: range | None = None) -> dict[str, Any]:
        await asyncio.to_thread(self.rc.wait_converged, 120.0, True)
        out = await mismatches(self.led, self.items)
        if extra is not None:
            more = await mismatches(self.led, extra)
            out = {r: {**out[r], **more[r]} for r in out}
        for region, off in out.items():  # name the pairs: what a count off the ledger is made of
            if off:
                self.pairs_off.setdefault(region, []).append({
                    "records_off_ledger": await self.differ(region, set(off)),
                    "stored_counts": await _stored(self.rc, region, set(off))})
        return out

    async def differ(self, region: str, items: set[int]) -> list[dict[str, Any]]:
        """The pairs of ``items`` whose record in ``region`` is not the ledger's state."""
        out = []
        async with httpx.AsyncClient(headers=self.rc.headers()) as http:
            for (user, item), on in sorted(self.led.state.items()):
                if item in items and await _has(self.rc, http, region, user, item) != on:
                    out.append({"user": user, "item": item, "ledger": on,
                                "sent_at": self.led.sent_at[(user, item)],
                                "acked_at": self.led.acked_at[(user, item)]})
        return out


async def run_witness(rc: RegionCluster, users: int = 60, items: int = 12, clients: int = 4,
                      phase_s: float = 4.0, recover: bool = True) -> dict[str, Any]:
    """``recover``: after the kill, recover and rejoin us and hold both regions to the ledger
    (else eu alone, the pairs us took along aside: the short case)."""
    out: dict[str, Any] = {"witness_ttl_s": rc.layout()["witness_ttl_s"]}
    ttl = float(out["witness_ttl_s"])
    run = Run(rc, users, items, clients)
    led = run.led
    us_users, eu_users = run.homed("us"), run.homed("eu")
    async with httpx.AsyncClient(headers=rc.headers()) as http:
        # 1. no majority anywhere: nothing automatic; both fence their own users
        rc.fail(WITNESS)
        rc.partition("us", "eu")
        await asyncio.sleep(1.5 * ttl + 1)  # longer than a lease and a tick
        out["no_majority"] = {
            "epochs": {r: await _epoch(rc, r) for r in rc.regions},
            "home_toggle_status": {
                "us": await _status(rc, http, "us", us_users[0], 940, led),
                "eu": await _status(rc, http, "eu", eu_users[0], 941, led)}}
        rc.heal()
        await asyncio.to_thread(rc.recover, WITNESS)
        out["no_majority"]["decide_again_s"] = await _until(
            lambda: _both_decide(rc), 60, "both regions decide again")

        # 2. us cut from eu and the witness, under load: eu takes over, us fences itself
        load = run.start_load(readers=["eu"])
        await asyncio.sleep(phase_s)
        epoch0 = await _epoch(rc, "eu")
        rc.partition("us", "eu")
        rc.partition("us", WITNESS)
        t_cut = time.monotonic()
        late = (us_users[1], 950)
        await led.write(http, late, True, "us")  # acknowledged by us, never reaches eu
        for k in range(5):
            await _view(rc, http, "us", 951, f"us-{k}")  # late increments
        for k in range(3):
            await _view(rc, http, "eu", 951, f"eu-{k}")
        probe = (us_users[2], 952)

        async def us_refuses() -> bool:
            return await _status(rc, http, "us", *probe, led) == 503

        async def eu_moved() -> bool:
            return await _epoch(rc, "eu") > epoch0

        await _until(us_refuses, 3 * ttl, "us fences itself")
        fenced_s = time.monotonic() - t_cut
        await _until(eu_moved, 6 * ttl, "eu takes over")
        failover_s = time.monotonic() - t_cut
        await led.write(http, (us_users[3], 953), True, "eu")
        first_write_s = time.monotonic() - t_cut
        await led.write(http, late, False, "eu")  # a no-op at eu: the user's newer intent
        await asyncio.sleep(phase_s)
        rc.heal()
        await run.stop_load(load)

        async def us_learns() -> bool:
            return await _epoch(rc, "us") > epoch0

        learn_s = await _until(us_learns, 30, "us learns the new epoch")
        t0 = time.monotonic()
        report = await asyncio.to_thread(rc.rejoin, "us")
        out["cut"] = {
            "us_fenced_after_s": fenced_s, "failover_after_s": failover_s,
            "first_us_user_write_at_eu_after_s": first_write_s,
            "us_learned_epoch_after_heal_s": learn_s, "rejoin_s": time.monotonic() - t0,
            "rejoin": {"late": report.late, "applied": report.applied, "agreed": report.agreed,
                       "conflicts": [(c.user, c.item) for c in report.conflicts]},
            "noop_case_state": {r: await _has(rc, http, r, *late) for r in rc.regions},
            "views_951": {r: await _views(rc, http, r, 951) for r in rc.regions},
            "split_brain": await split_brain(rc),
            "read_failures_eu": led.read_failures.get("eu", 0)}
        out["after_cut"] = await run.converged(range(940, 954))
        out["cut"]["since"] = await _since(rc)

        # 3. us back home, then killed under load: eu takes over by itself
        epoch1 = await asyncio.to_thread(rc.restore, "us")
        await _until(lambda: _both_decide(rc, epoch1), 60, "both decide by the restored map")
        load = run.start_load(readers=["eu"])
        await asyncio.sleep(phase_s)
        t_kill, t0 = time.time(), time.monotonic()
        # In a thread: the clients go on reading answers meanwhile. A write us answered just
        # before its death may still be read after it: at risk is what was sent before t_dead.
        out["killed"] = await asyncio.to_thread(rc.fail, "us")
        t_dead = time.time()

        async def eu_took() -> bool:
            return await _epoch(rc, "eu") > epoch1

        kill_failover_s = await _until(eu_took, 6 * ttl, "eu takes over the dead us")
        await led.write(http, (us_users[4], 954), True, "eu")
        kill_first_write_s = time.monotonic() - t0
        await asyncio.sleep(phase_s)
        await run.stop_load(load)
        risky = await led.at_risk("eu", "us", t_dead)
        out["kill"] = {
            "failover_after_s": kill_failover_s,
            "first_us_user_write_at_eu_after_s": kill_first_write_s,
            "at_risk_likes": len(risky), "window_s": t_kill - min(risky) if risky else 0.0,
            "kill_took_s": t_dead - t_kill, "read_failures_eu": led.read_failures.get("eu", 0),
            "t_kill": t_kill, "t_dead": t_dead}
        if not recover:  # eu alone: its counts are the ledger's, but for what us took along
            taken = {item for _user, item in await _lacking(run, "eu", t_dead)}
            want, off = led.expected(run.items), {}
            for _ in range(20):  # a hot item is served from memory for up to hot_ttl_s
                got = await led.counts("eu", run.items)
                off = {i: (got[i], want[i]) for i in run.items
                       if got[i] != want[i] and i not in taken}
                if not off:
                    break
                await asyncio.sleep(0.25)
            out["kill"]["eu_off_ledger_not_at_risk"] = off
            if off:  # name the pairs: a wrong record, or a count unlike its records
                out["kill"]["pairs_off_ledger"] = {
                    "records_off_ledger": await run.differ("eu", set(off)),
                    "stored_counts": await _stored(rc, "eu", set(off))}
            return out
        t0 = time.monotonic()
        report = await asyncio.to_thread(rc.recover, "us")
        out["kill"].update(recover_rejoin_s=time.monotonic() - t0, rejoin={
            "late": report.late, "applied": report.applied, "conflicts": len(report.conflicts)})
        out["kill"]["split_brain"] = await split_brain(rc)  # us's log readable again
        out["after_kill"] = await run.converged(range(940, 955))
    out["write_retries"] = led.retries
    out["pairs_off_ledger"] = run.pairs_off
    return out


async def _lacking(run: Run, region: str, before: float) -> list[tuple[str, int]]:
    """The pairs whose acknowledged state (its request sent before ``before``) ``region``'s
    records lack."""
    led = run.led
    out = []
    async with httpx.AsyncClient(headers=led.rc.headers()) as http:
        for (user, item), on in list(led.state.items()):
            if item < len(run.items) and led.sent_at[(user, item)] < before and \
                    await _has(led.rc, http, region, user, item) != on:
                out.append((user, item))
    return out


async def _stored(rc: RegionCluster, region: str, items: set[int]) -> dict[int, int]:
    """The like counts PostgreSQL holds in ``region`` (no cache between): beside the counts the
    API served, they tell a wrong record from a stale cached count."""
    async with RegionHandle(load(rc.config(region))) as h:
        got = await h.pg.counts.get([("like", f"post:{i}") for i in sorted(items)])
    return {i: got.get(("like", f"post:{i}"), 0) for i in sorted(items)}


async def _since(rc: RegionCluster) -> float:
    """When the newest placement epoch began (its decision time)."""
    async with RegionHandle(load(rc.config(rc.regions[-1]))) as h:
        return (await h.placement()).since


async def _both_decide(rc: RegionCluster, epoch: int = 0) -> bool:
    got = [await asyncio.to_thread(_ready, rc, r) for r in rc.regions]
    return all(d.get("witness_may_decide") and (d.get("placement_epoch") or 0) >= epoch
               for d in got)


async def _has(rc: RegionCluster, http: httpx.AsyncClient, region: str, user: str,
               item: int) -> bool:
    r = await http.get(f"{rc.api(region)}/v1/has/like/{user}/post/{item}", timeout=5.0)
    r.raise_for_status()
    return bool(r.json()["on"])


async def _arrives(rc: RegionCluster, http: httpx.AsyncClient, user: str, item: int,
                   at: str, seconds: float) -> bool:
    """Whether ``user``'s like of ``item`` is in region ``at``'s records within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await _has(rc, http, at, user, item):
            return True
        await asyncio.sleep(0.2)
    return False


async def run_three(rc: RegionCluster, users: int = 60, items: int = 12, clients: int = 4,
                    phase_s: float = 4.0) -> dict[str, Any]:
    out: dict[str, Any] = {"regions": rc.regions}
    ttl = float(rc.layout()["witness_ttl_s"])
    run = Run(rc, users, items, clients)
    led = run.led
    async with httpx.AsyncClient(headers=rc.headers()) as http:
        load = run.start_load(readers=list(rc.regions))
        await asyncio.sleep(phase_s)
        await run.stop_load(load)
        out["after_load"] = await run.converged()
        # ap (a leaf) killed under load: failed over by the majority, recovered, rejoined
        load = run.start_load(readers=["us", "eu"])
        await asyncio.sleep(phase_s / 2)
        epoch0 = await _epoch(rc, "us")
        t_kill, t0 = time.time(), time.monotonic()
        rc.fail("ap")

        async def moved() -> bool:
            return await _epoch(rc, "us") > epoch0 and await _epoch(rc, "eu") > epoch0

        out["ap_failover_after_s"] = await _until(moved, 6 * ttl, "ap failed over")
        ap_user = run.homed("ap")[0]
        taker_before = [r for r in rc.regions if r != "ap"]
        await led.write(http, (ap_user, 960), True, taker_before[0])
        out["ap_first_write_after_s"] = time.monotonic() - t0
        await asyncio.sleep(phase_s / 2)
        await run.stop_load(load)
        out["ap_at_risk_likes"] = len(await led.at_risk("us", "ap", t_kill))
        t0 = time.monotonic()
        report = await asyncio.to_thread(rc.recover, "ap")
        out["ap_recover_rejoin_s"] = time.monotonic() - t0
        out["ap_rejoin"] = {"late": report.late, "applied": report.applied,
                            "conflicts": len(report.conflicts)}
        out["after_ap_rejoin"] = await run.converged(range(960, 961))
        out["read_failures_while_ap_down"] = dict(led.read_failures)
        # eu|ap cut under load (no region loses the majority: no failover), healed
        epoch1 = await _epoch(rc, "us")
        load = run.start_load(readers=list(rc.regions))
        rc.partition("eu", "ap")
        await asyncio.sleep(phase_s)
        rc.heal()
        await run.stop_load(load)
        out["epoch_change_during_cut"] = await _epoch(rc, "us") - epoch1
        out["after_cut_heal"] = await run.converged()
        # us killed (the leaf-node hub too, unless the hub is in the witness place): does a
        # like decided at eu still reach ap?
        out["leaf_hub"] = rc.hub
        eu_user = run.homed("eu")[0]
        await led.write(http, (eu_user, 961), True, "eu")
        out["us_up_eu_like_reaches_ap"] = await _arrives(rc, http, eu_user, 961, "ap", 10.0)
        rc.fail("us")
        t0 = time.monotonic()
        await led.write(http, (eu_user, 962), True, "eu")
        arrived = await _arrives(rc, http, eu_user, 962, "ap", 10.0)
        out["us_down_eu_like_reaches_ap_within_10s"] = arrived
        if arrived:
            out["us_down_eu_like_at_ap_after_s"] = time.monotonic() - t0
        report = await asyncio.to_thread(rc.recover, "us")
        out["us_recover"] = {"late": report.late, "applied": report.applied,
                             "conflicts": len(report.conflicts)}
        out["after_us_back"] = await run.converged(range(960, 963))
        if rc.hub == WITNESS:
            out["hub_lost"] = await _hub_lost(rc, run, http, eu_user)
            out["after_hub_back"] = await run.converged(range(960, 965))
    out["write_retries"] = led.retries
    out["pairs_off_ledger"] = run.pairs_off
    return out


async def _hub_lost(rc: RegionCluster, run: Run, http: httpx.AsyncClient, eu_user: str
                    ) -> dict[str, Any]:
    """The hub outside the regions lost, then back: each region keeps deciding its own users'
    writes and answering reads; replication between them waits for the hub and resumes after
    it."""
    rc.fail(WITNESS)
    t0 = time.monotonic()
    await run.led.write(http, (eu_user, 963), True, "eu")
    out: dict[str, Any] = {
        "eu_like_acknowledged_s": time.monotonic() - t0,
        "eu_like_reaches_ap_within_5s": await _arrives(rc, http, eu_user, 963, "ap", 5.0)}
    await asyncio.to_thread(rc.recover, WITNESS)
    out["hub_down_s"] = time.monotonic() - t0

    async def everywhere() -> bool:
        return all([await _has(rc, http, r, eu_user, 963) for r in rc.regions])

    out["hub_back_to_like_everywhere_s"] = await _until(everywhere, 120,
                                                        "replication after the hub")
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tally_dev.regions_failover")
    p.add_argument("--dir", default="/tmp/tally-regions-failover")
    p.add_argument("--phase-s", type=float, default=8.0)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--ttl-s", type=float, default=10.0, help="the regions' witness lease")
    p.add_argument("--net", type=int, default=9)
    p.add_argument("--only", choices=("witness", "three"))
    p.add_argument("--leaf-hub", choices=("region", WITNESS), default=WITNESS,
                   help="three regions: where the NATS leaf nodes meet")
    p.add_argument("--out", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    out: dict[str, Any] = {}
    for name, count in (("witness", 2), ("three", 3)):
        if args.only not in (None, name):
            continue
        rc = RegionCluster(Path(args.dir) / name, partitions=8)
        rc.up(count, net=args.net, witness=True, witness_ttl_s=args.ttl_s,
              hub=args.leaf_hub if name == "three" else "region")
        try:
            job = run_witness if name == "witness" else run_three
            out[name] = asyncio.run(job(rc, users=args.users, items=40, clients=6,
                                        phase_s=args.phase_s))
        finally:
            rc.down()
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    bad = [f"{name}.{k}" for name, res in out.items() for k, v in res.items()
           if k.startswith("after_") and any(v.values())]
    bad += [f"{name}.split_brain" for name, res in out.items() for phase in ("cut", "kill")
            if res.get(phase, {}).get("split_brain", {}).get("decided_by_two_in_one_epoch")]
    if bad:
        print(f"counts off the ledger or split brain: {bad}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
