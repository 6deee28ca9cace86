"""Cross-region visibility of a like under load: ``python -m tally_dev.regions_visibility``.

Two regions under the client ledger's load (``regions_chaos.Ledger``: writers through either
region, readers of every item in both); a probe likes fresh items at their user's home, one at
a time, and times when the other region's like records hold it (``/v1/has``, no cache) and when
its count API answers it, and the same count at the home region itself. Where the time goes is
read afterwards from JetStream's own timestamps: when the home region's stream stored the
like's message (the relay's share: commit to log), when the other region's stream stored its
sourced copy (the leaf link and JetStream's sourcing), and the rest (the aggregator's window and
commit, then the API's caches). Prints p50, p99 and the sample count of each.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import nats
from nats.js import api

from tally.core.regions import hash_home
from tally.settings import load
from tally.store.jetstream.eventlog import decode_run, partition_of, stream_name
from tally_dev.regions import RegionCluster
from tally_dev.regions_chaos import Ledger, pct, visibility


async def probe(rc: RegionCluster, samples: int, base_item: int) -> list[dict[str, Any]]:
    """Like fresh items one at a time at their user's home; wall-clock times of the ack and of
    when the other region's records and count API show it."""
    out: list[dict[str, Any]] = []
    async with httpx.AsyncClient(headers=rc.headers()) as http:
        for k in range(samples):
            user, item = f"vis{k}", base_item + k
            home = hash_home(user, tuple(sorted(rc.regions)))
            other = next(r for r in rc.regions if r != home)
            await http.post(f"{rc.api(home)}/v1/like", json={
                "user_id": user, "item_type": "post", "item_id": item}, timeout=5.0)
            row: dict[str, Any] = {"user": user, "item": f"post:{item}", "home": home,
                                   "other": other, "acked": time.time()}
            while len(row) < 7 and time.time() - row["acked"] < 15:
                if "records" not in row:
                    r = await http.get(f"{rc.api(other)}/v1/has/like/{user}/post/{item}",
                                       timeout=2.0)
                    if r.json()["on"]:
                        row["records"] = time.time()
                if "count" not in row:
                    r = await http.get(f"{rc.api(other)}/v1/items/post/{item}/counts",
                                       timeout=2.0)
                    if r.json()["counts"]["like"] == 1:
                        row["count"] = time.time()
                await asyncio.sleep(0.01)
            out.append(row)
            await asyncio.sleep(0.2)
    return out


async def stored_at(rc: RegionCluster, region: str, origin: str, rows: list[dict[str, Any]]
                    ) -> dict[tuple[str, str], float]:
    """When ``region``'s stream stored the message carrying each probe's like (written by
    ``origin``), by JetStream's timestamp."""
    s = load(rc.config(region))
    nc = await nats.connect(s.nats_url)
    found: dict[tuple[str, str], float] = {}
    try:
        js = nc.jetstream()
        wanted = {(r["user"], r["item"]) for r in rows if r["home"] == origin}
        for p in sorted({partition_of("like", r["item"], s.log_partitions) for r in rows}):
            sub = await js.pull_subscribe(
                f"{s.nats_stream.lower()}.{origin}.p.{p}", stream=stream_name(s.nats_stream,
                                                                              region),
                config=api.ConsumerConfig(
                    deliver_policy=api.DeliverPolicy.BY_START_TIME,
                    opt_start_time=datetime.fromtimestamp(min(r["acked"] for r in rows) - 5,
                                                          UTC),
                    ack_policy=api.AckPolicy.NONE, mem_storage=True, num_replicas=1))
            for _ in range(10_000):  # bounded: a probe run is a few thousand messages
                try:
                    msgs = await sub.fetch(256, timeout=1.0)
                except TimeoutError:
                    break
                for m in msgs:
                    for ev in decode_run(m.data):
                        if (ev.user, ev.item) in wanted and ev.delta > 0:
                            found.setdefault((ev.user or "", ev.item),
                                             m.metadata.timestamp.timestamp())
                if msgs[-1].metadata.num_pending == 0:
                    break
            await sub.unsubscribe()
    finally:
        await nc.close()
    return found


async def breakdown(rc: RegionCluster, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per stage, from the ack: home stream stored, other stream stored, records, count."""
    home_at: dict[tuple[str, str], float] = {}
    other_at: dict[tuple[str, str], float] = {}
    for home in rc.regions:
        other = next(r for r in rc.regions if r != home)
        home_at.update(await stored_at(rc, home, home, rows))
        other_at.update(await stored_at(rc, other, home, rows))
    # The ack is timed when the client reads the answer, which may be after the relay published.
    stages: dict[str, list[float]] = {"relay (ack to home log)": [],
                                      "sourcing (home log to other log)": [],
                                      "apply (other log to records)": [],
                                      "count API after records": []}
    for r in rows:
        key = (r["user"], r["item"])
        if key not in home_at or key not in other_at or "records" not in r or "count" not in r:
            continue
        stages["relay (ack to home log)"].append(home_at[key] - r["acked"])
        stages["sourcing (home log to other log)"].append(other_at[key] - home_at[key])
        stages["apply (other log to records)"].append(r["records"] - other_at[key])
        stages["count API after records"].append(r["count"] - r["records"])
    return {k: figures(v) for k, v in stages.items()}


async def local_visibility(rc: RegionCluster, samples: int, base_item: int) -> list[float]:
    """Like a fresh item at its user's home; time until the home's own count API answers 1."""
    out: list[float] = []
    async with httpx.AsyncClient(headers=rc.headers()) as http:
        for k in range(samples):
            user, item = f"local{k}", base_item + k
            home = rc.api(hash_home(user, tuple(sorted(rc.regions))))
            await http.post(f"{home}/v1/like", json={"user_id": user, "item_type": "post",
                                                     "item_id": item}, timeout=5.0)
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 15:
                r = await http.get(f"{home}/v1/items/post/{item}/counts", timeout=2.0)
                if r.json()["counts"]["like"] == 1:
                    out.append(time.perf_counter() - t0)
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
    return out


def figures(delays: list[float]) -> dict[str, float]:
    return {"n": len(delays), "p50_ms": round(1000 * pct(delays, 0.5), 1),
            "p99_ms": round(1000 * pct(delays, 0.99), 1),
            "max_ms": round(1000 * max(delays, default=0.0), 1)}


async def run(rc: RegionCluster, probes: int = 40, users: int = 200, items: int = 60,
              clients: int = 8) -> dict[str, Any]:
    led = Ledger(rc, users, items)
    await visibility(rc, 1, 19_999)  # cross-domain sourcing starts a few seconds after creation
    tasks = [asyncio.create_task(led.client(n, clients, range(items))) for n in range(clients)]
    tasks += [asyncio.create_task(led.reader(r, range(items))) for r in rc.regions]
    t0 = time.monotonic()
    rows = await probe(rc, probes, 20_000)
    local = await local_visibility(rc, probes // 2, 30_000)
    seconds = time.monotonic() - t0
    led.stop = True
    await asyncio.gather(*tasks)
    writes = sum(len(v) for v in led.latency.values())
    return {"records_other_region": figures([r["records"] - r["acked"] for r in rows
                                             if "records" in r]),
            "count_other_region": figures([r["count"] - r["acked"] for r in rows
                                           if "count" in r]),
            "missed": sum(1 for r in rows if "count" not in r or "records" not in r),
            "count_home_region": figures(local),
            "stages": await breakdown(rc, rows),
            "load": {"seconds": round(seconds, 1), "writes": writes,
                     "writes_per_s": round(writes / seconds, 1), "reads": led.reads,
                     "read_failures": led.read_failures}}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tally_dev.regions_visibility")
    p.add_argument("--dir", default="/tmp/tally-regions-visibility")
    p.add_argument("--probes", type=int, default=40)
    p.add_argument("--clients", type=int, default=8, help="writers of the load (0: readers only)")
    p.add_argument("--net", type=int, default=10, help="namespace net number (10.250.N.0/24)")
    p.add_argument("--out", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    rc = RegionCluster(Path(args.dir), partitions=8)
    rc.up(2, net=args.net)
    try:
        out = asyncio.run(run(rc, probes=args.probes, clients=args.clients))
    finally:
        rc.down()
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
