"""A small bounded load loop for the scale-out figures: likes or batch-50 reads, against URLs.

    python scripts/scale_bench.py --mode like --seconds 10 --concurrency 32 URL [URL ...]

Each of ``concurrency`` asyncio tasks sends one request at a time, round-robin over the URLs,
until ``seconds`` pass or ``max_requests`` are sent. Prints JSON: requests/s, p50, p99, errors.
The full load generator lives in the bench tooling; this one only has to be the same for every
backend measured side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import time

import httpx


async def worker(n: int, urls: list[str], mode: str, stop_at: float, budget: itertools.count,
                 limit: int, lat: list[float], errors: list[str], items: int, users: int) -> None:
    rng = random.Random(n)
    async with httpx.AsyncClient(timeout=10.0) as http:
        i = n
        while time.monotonic() < stop_at and next(budget) < limit:
            url = urls[i % len(urls)]
            i += 1
            if mode == "like":
                path = "/v1/like" if rng.random() < 0.7 else "/v1/unlike"
                body: dict[str, object] = {"user_id": rng.randrange(users), "item_type": "post",
                                           "item_id": int(rng.paretovariate(1.2)) % items}
            else:
                path = "/v1/counts"
                body = {"items": [{"item_type": "post", "item_id": rng.randrange(items)}
                                  for _ in range(50)], "counters": ["like"]}
            t = time.perf_counter()
            try:
                r = await http.post(url + path, json=body)
                if r.status_code != 200:
                    errors.append(str(r.status_code))
                    continue
            except httpx.HTTPError as exc:
                errors.append(type(exc).__name__)
                continue
            lat.append(time.perf_counter() - t)


async def run(urls: list[str], mode: str, seconds: float, concurrency: int, limit: int,
              items: int, users: int) -> dict[str, object]:
    lat: list[float] = []
    errors: list[str] = []
    budget = itertools.count()
    start = time.monotonic()
    await asyncio.gather(*(worker(n, urls, mode, start + seconds, budget, limit, lat, errors,
                                  items, users) for n in range(concurrency)))
    elapsed = time.monotonic() - start
    lat.sort()

    def pct(p: float) -> float:
        return round(lat[min(int(len(lat) * p), len(lat) - 1)] * 1000, 2) if lat else 0.0

    return {"mode": mode, "urls": len(urls), "concurrency": concurrency, "ok": len(lat),
            "errors": len(errors), "rps": round(len(lat) / elapsed, 1), "p50_ms": pct(0.5),
            "p99_ms": pct(0.99)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("urls", nargs="+")
    p.add_argument("--mode", choices=("like", "counts"), default="like")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-requests", type=int, default=500_000)
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--users", type=int, default=100_000)
    a = p.parse_args()
    print(json.dumps(asyncio.run(run(a.urls, a.mode, a.seconds, a.concurrency, a.max_requests,
                                     a.items, a.users))))


if __name__ == "__main__":
    main()
