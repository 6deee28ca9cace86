"""``tally demo``: a realistic small data set pushed into a running service through the client.

Users like items with Zipf popularity (a few items get most likes), one item goes viral, some likes
are taken back, every tenth request is retried as a client would after a timeout, and some views
are counted with idempotency keys. At the end the demo reads the counts back and checks them
against what it sent.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tally.client import AsyncTally


@dataclass
class DemoPlan:
    users: int = 10_000
    items: int = 1_000
    likes_per_user: int = 8
    zipf_s: float = 1.0
    viral_share: float = 0.4  # of users who like the viral item
    unlike_share: float = 0.05
    seed: int = 7


def zipf_sampler(n: int, s: float, rng: random.Random) -> Callable[[], int]:
    weights = [1.0 / (rank ** s) for rank in range(1, n + 1)]
    total = sum(weights)
    cumulative, acc = [], 0.0
    for w in weights:
        acc += w / total
        cumulative.append(acc)

    def draw() -> int:
        import bisect

        return min(bisect.bisect_left(cumulative, rng.random()), n - 1)

    return draw


def generate(plan: DemoPlan, tag: str) -> tuple[list[list[dict[str, Any]]], Counter[int]]:
    """The operations in two phases (likes, then unlikes) and each item's final like count.

    Item ids carry ``tag`` so that a second demo run starts from zero on items of its own.
    """
    rng = random.Random(plan.seed)
    draw = zipf_sampler(plan.items, plan.zipf_s, rng)
    viral = plan.items + 1  # an item id past the Zipf range: it gets its likes from virality alone
    ops: list[dict[str, Any]] = []
    unlikes: list[dict[str, Any]] = []  # sent after the likes, as they happen later in life
    liked: dict[int, set[int]] = {}
    for user in range(1, plan.users + 1):
        mine = {draw() + 1 for _ in range(plan.likes_per_user)}
        if rng.random() < plan.viral_share:
            mine.add(viral)
        for item in mine:
            ops.append({"op": "like", "user_id": user, "item_type": "post",
                        "item_id": f"{tag}-{item}"})
        if mine and rng.random() < plan.unlike_share:
            gone = rng.choice(sorted(mine))
            mine.discard(gone)
            unlikes.append({"op": "unlike", "user_id": user, "item_type": "post",
                            "item_id": f"{tag}-{gone}"})
        liked[user] = mine
    expected: Counter[int] = Counter(item for items in liked.values() for item in items)
    return [ops, unlikes], expected


def _chunks(ops: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for i in range(0, len(ops), size):
        yield ops[i:i + size]


def _progress(done: int, total: int, started: float) -> None:
    rate = done / max(time.monotonic() - started, 1e-9)
    sys.stderr.write(f"\r  {done:>9,}/{total:,} operations  {rate:>9,.0f} ops/s")
    sys.stderr.flush()


async def run_demo(url: str, plan: DemoPlan, concurrency: int = 4) -> dict[str, Any]:
    tag = f"demo{int(time.time())}"
    phases, expected = generate(plan, tag)
    total = sum(map(len, phases))
    print(f"demo: {plan.users:,} users, {plan.items:,} Zipf items (s={plan.zipf_s}) + 1 viral, "
          f"{total:,} like/unlike operations on post:{tag}-N")
    async with AsyncTally(url, timeout=60) as client:
        started = time.monotonic()
        done = 0
        retried = 0

        async def worker(queue: list[list[dict[str, Any]]]) -> None:
            nonlocal done, retried
            while queue:
                chunk = queue.pop()
                await client.bulk(chunk)
                if len(queue) % 10 == 0:  # a client retry after a lost answer: must change nothing
                    again = await client.bulk(chunk)
                    retried += len(chunk)
                    assert not any(r["changed"] for r in again), "a retried bulk changed state"
                done += len(chunk)
                _progress(done, total, started)

        for ops in phases:  # unlikes only once every like is in: a retry must then change nothing
            queue = list(reversed(list(_chunks(ops, 1000))))
            await asyncio.gather(*(worker(queue) for _ in range(concurrency)))
        elapsed = time.monotonic() - started
        sys.stderr.write("\n")
        views = [{"op": "incr", "counter": "view", "item_type": "post", "item_id": f"{tag}-{i}",
                  "idempotency_key": f"{tag}-view-{i}"} for i in range(1, 101)]
        await client.bulk(views)
        await client.bulk(views)  # repeated keys: counted once
        print(f"  wrote {total:,} operations (+{retried:,} retried) in {elapsed:.1f}s "
              f"= {total / elapsed:,.0f} ops/s")
        return await _verify(client, expected, plan, tag)


async def _verify(client: AsyncTally, expected: Counter[int], plan: DemoPlan,
                  tag: str) -> dict[str, Any]:
    items = list(range(1, plan.items + 2))
    deadline = time.monotonic() + 30
    while True:
        got: dict[int, int] = {}
        for batch in (items[i:i + 500] for i in range(0, len(items), 500)):
            counts = await client.counts([("post", f"{tag}-{i}") for i in batch], ["like"])
            got.update({i: c["like"] for i, c in zip(batch, counts, strict=True)})
        wrong = {i: (got[i], expected.get(i, 0)) for i in items if got[i] != expected.get(i, 0)}
        if not wrong or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)  # counts are eventually consistent: let the aggregator catch up
    top = sorted(got.items(), key=lambda kv: -kv[1])[:5]
    print("  top items: " + ", ".join(f"post:{tag}-{i}={n:,}" for i, n in top))
    print(f"  viral item post:{tag}-{plan.items + 1} has {got[plan.items + 1]:,} likes")
    views = (await client.counts([("post", f"{tag}-1")], ["view"]))[0]["view"]
    print(f"  post:{tag}-1 views = {views} (sent twice with one idempotency key)")
    print("  counts match the operations sent" if not wrong
          else f"  MISMATCH on {len(wrong)} items, e.g. {list(wrong.items())[:3]}")
    return {"items": len(items), "mismatched": len(wrong), "top": top}
