"""The scale-out figures, side by side in one run: embedded vs the local cluster.

    python scripts/scale_measure.py --cluster-dir /tmp/tally-cluster --embedded URL

For each of likes and batch-50 reads, runs the same bounded load loop (scale_bench.py) against
the embedded server and against the cluster's API processes, alternating, ``--rounds`` times.
During the cluster's like load it samples the event log's lag from the relay's and aggregators'
/readyz. Last, it SIGKILLs aggregator-0 under like load and reports how long after the kill each
taken-over partition applied its first batch on the surviving aggregator. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from scale_bench import run

from tally_dev.cluster import DevCluster, log_lag


async def sample_lag(cluster: DevCluster, stop: asyncio.Event, out: dict[str, float]) -> None:
    while not stop.is_set():
        lag = await asyncio.to_thread(lambda: log_lag(cluster.status()))
        for k, v in lag.items():
            out[k] = max(out.get(k, 0.0), v)
        await asyncio.sleep(0.5)


async def cluster_load(cluster: DevCluster, mode: str, seconds: float,
                       concurrency: int) -> dict[str, object]:
    stop, lag = asyncio.Event(), {}
    sampler = asyncio.create_task(sample_lag(cluster, stop, lag))
    result = await run(cluster.urls("api"), mode, seconds, concurrency, 500_000, 10_000, 100_000)
    stop.set()
    await sampler
    return {"backend": "cluster", **result, "max_lag": lag}


async def takeover(cluster: DevCluster, concurrency: int, limit_s: float = 30.0
                   ) -> dict[str, object]:
    """Kill aggregator-0 under like load (uniform items: every partition gets traffic); poll the
    survivor until every partition it took over has applied a batch. Reports, per partition, when
    the survivor had it open at the committed position and when it applied its first batch."""
    load = asyncio.create_task(run(cluster.urls("api"), "like", limit_s + 5, concurrency,
                                   500_000, 10_000, 100_000, uniform=True))  # every partition
    await asyncio.sleep(3)
    survivor = cluster.urls("aggregator")[1]
    async with httpx.AsyncClient() as http:
        before = set((await http.get(f"{survivor}/readyz")).json()["partitions"])
        killed_at = time.time()
        cluster.kill("aggregator-0")
        while time.time() - killed_at < limit_s:
            now = (await http.get(f"{survivor}/readyz")).json()
            taken = [p for p in now["partitions"] if p not in before]
            applied = {p: now["first_applied_at"][str(p)] for p in taken}
            reading = {p: now["reading_since"][str(p)] for p in taken}
            if taken and all(applied.values()):
                break
            await asyncio.sleep(0.1)
    load.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await load
    return {"takeover": {"reading_after_kill_s": {p: t and round(t - killed_at, 3)
                                                  for p, t in reading.items()},
                         "first_apply_after_kill_s": {p: t and round(t - killed_at, 3)
                                                      for p, t in applied.items()}}}


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cluster-dir", default="/tmp/tally-cluster")
    p.add_argument("--embedded", required=True)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    cluster = DevCluster(Path(a.cluster_dir))
    for n in range(a.rounds):
        for mode in ("like", "counts"):
            order = ("embedded", "cluster") if n % 2 == 0 else ("cluster", "embedded")
            for backend in order:
                if backend == "embedded":
                    res = {"backend": "embedded", **await run([a.embedded], mode, a.seconds,
                                                              a.concurrency, 500_000, 10_000,
                                                              100_000)}
                else:
                    res = await cluster_load(cluster, mode, a.seconds, a.concurrency)
                print(json.dumps({"round": n, **res}), flush=True)
    print(json.dumps(await takeover(cluster, a.concurrency)), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
