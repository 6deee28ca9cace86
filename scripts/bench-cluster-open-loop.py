"""Where the cluster's open-loop latency forms: in the API's handler, or before it.

Brings up the suite's smallest cluster (one API, relay and aggregator; one PostgreSQL, NATS and
Redis), measures its closed-loop maximum of uniform likes at 64 connections, then runs the open
loop at ``--share`` of that maximum once per pool size given, in turn. Each open-loop run prints
the client's p50/p99 (from each request's intended send time) beside the share of likes the API's
own ``tally_http_request_seconds`` histogram saw take over 20 ms and over 100 ms inside the
handler, and how long requests waited in the generator for a free connection. A client latency
far above the handler's is a queue before the handler: the generator's pool when its wait is
the difference, else the sockets and the event loop; a handler that is slow itself is a
saturated cluster. Every run likes as users of its own, so every like is a new one (a repeated
like writes nothing).

    .venv/bin/python scripts/bench-cluster-open-loop.py --pools 64,128,256 --share 0.7
"""

from __future__ import annotations

import argparse
import re
import tempfile
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tally_dev.bench import loadgen
from tally_dev.bench.loadgen import RunSpec
from tally_dev.bench.report import run_dict
from tally_dev.cluster import DevCluster, Layout

_BUCKET = re.compile(r'tally_http_request_seconds_bucket\{([^}]*)\} (\S+)')


def like_buckets(api_url: str) -> dict[str, float]:
    """The API's cumulative latency buckets of ``/v1/like``, by upper bound."""
    text = urllib.request.urlopen(f"{api_url}/metrics", timeout=10).read().decode()
    out: dict[str, float] = defaultdict(float)
    for labels, value in _BUCKET.findall(text):
        if 'endpoint="/v1/like"' in labels:
            le = re.search(r'le="([^"]+)"', labels)
            if le:
                out[le.group(1)] += float(value)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pools", default="64,128,256", help="connection counts, one open loop each")
    p.add_argument("--share", type=float, default=0.7, help="of the closed-loop maximum")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per run")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tally-open-loop-"))
    root.chmod(0o755)  # PostgreSQL runs as its own user and must enter the directory
    layout = Layout(apis=1, relays=1, aggregators=1, partitions=4, databases=1)
    cluster = DevCluster(root / "cluster", layout, settings={"log_level": "WARNING"})
    cluster.up()
    try:
        url = cluster.urls("api")[0]
        port = urlsplit(url).port or 80
        runs = 0

        def run(mode: str, connections: int, rate: float = 0.0) -> dict[str, Any]:
            nonlocal runs
            runs += 1
            spec = RunSpec(name=f"{mode}-{connections}", host="127.0.0.1", port=port,
                           preset="uniform", mode=mode, rate=rate, duration_s=args.duration,
                           connections=connections, run_id=runs)
            return run_dict(loadgen.run(spec, False))

        top = run("closed", 64)["throughput_per_s"]
        rate = args.share * top
        print(f"closed loop, 64 connections: {top:,.0f} likes/s; open loop at {rate:,.0f}/s")
        for pool in (int(n) for n in args.pools.split(",")):
            before = like_buckets(url)
            result = run("open", pool, rate)
            after = like_buckets(url)
            done = {le: after[le] - before.get(le, 0.0) for le in after}
            total = done.get("+Inf", 0.0) or 1.0
            lat = result["latency"]
            wait = result["generator_wait"]
            print(f"pool {pool:>4}: client p50 {lat['p50_ms']:7.1f} ms, p99 {lat['p99_ms']:7.1f} ms, "
                  f"of which waiting for a connection p99 {wait.get('p99_ms', 0.0):7.1f} ms; "
                  f"errors {result['errors']}; in the handler over 20 ms "
                  f"{100 * (1 - done.get('0.02', 0.0) / total):5.1f}%, over 100 ms "
                  f"{100 * (1 - done.get('0.1', 0.0) / total):5.1f}%", flush=True)
    finally:
        cluster.down()


if __name__ == "__main__":
    main()
