"""Workload presets: seeded generators of operations, each one or more HTTP requests.

An operation is what one latency sample measures: a like is one request, a feed read is one
request for the counts of 50 items and whether the viewer liked each (what a feed page waits
for). Every generator is deterministic for a (preset, seed, worker) triple, so a run can be
repeated exactly.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from tally.batching import BATCHER_MAX_OPS

Request = bytes  # a complete HTTP/1.1 request, head and body
Op = tuple[str, tuple[Request, ...]]  # (kind, requests sent in sequence on one connection)


def http_request(path: str, body: Any, host: str = "bench") -> Request:
    data = orjson.dumps(body)
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n")
    return head.encode() + data


@dataclass(frozen=True)
class Params:
    """Knobs shared by the presets; the defaults are the documented suite."""

    items: int = 10_000_000  # item space (Zipf and uniform draw from 1..items)
    users: int = 1_000_000_000
    zipf_s: float = 1.0
    viral_share: float = 0.4  # share of likes that go to the one viral item
    feed_size: int = 50
    read_share: float = 0.8  # mixed: reads / all operations
    retry_share: float = 0.05  # mixed: writes that repeat an earlier write
    keyed_share: float = 0.2  # incr: increments that carry an idempotency key
    bulk_size: int = BATCHER_MAX_OPS  # bulk: likes per /v1/bulk request, as the batcher sends


class Zipf:
    """Draws k in 1..n with P(k) ~ 1/k^s by inverting the continuous density's CDF.

    Exact sampling over billions of items needs a table of n entries; the continuous inverse
    costs O(1) per draw and matches the discrete law to within the rounding of the head."""

    def __init__(self, n: int, s: float, rng: random.Random) -> None:
        self.n, self.s, self.rng = n, s, rng
        self._log_n = math.log(n + 1)
        self._span = (n + 1) ** (1 - s) - 1 if s != 1.0 else 0.0

    def draw(self) -> int:
        u = self.rng.random()
        x = math.exp(u * self._log_n) if self.s == 1.0 else (1 + u * self._span) ** (1 / (1 - self.s))
        return min(max(int(x), 1), self.n)


class Generator:
    """Yields the operations of one preset for one worker process."""

    def __init__(self, preset: str, params: Params, seed: int, worker: int, run_id: int = 0) -> None:
        """``run_id`` keeps the users of different runs apart: a second run against the same
        server would otherwise replay the first one's likes, which then change nothing (cheap
        idempotent repeats instead of new likes). Items follow the seed alone, so every target
        of a comparison sees the same item sequence."""
        if preset not in PRESETS:
            raise ValueError(f"unknown workload {preset!r} (known: {', '.join(PRESETS)})")
        self.preset = preset
        self.p = params
        self.worker = worker
        self.run_id = run_id
        self.rng = random.Random(f"{seed}/{preset}/{worker}")
        self.zipf = Zipf(params.items, params.zipf_s, self.rng)
        self.seq = 0
        self.recent: deque[Op] = deque(maxlen=1000)
        self._next: Callable[[], Op] = getattr(self, f"_{preset}")

    def next(self) -> Op:
        self.seq += 1
        return self._next()

    def _fresh_user(self) -> int:
        """A user that has not liked yet: likes then really change state."""
        return (self.run_id * 256 + self.worker) * 10_000_000_000 + self.seq

    def _like(self, item: int) -> Op:
        body = {"user_id": self._fresh_user(), "item_type": "post", "item_id": item}
        return "like", (http_request("/v1/like", body),)

    def _uniform(self) -> Op:
        return self._like(self.rng.randint(1, self.p.items))

    def _zipf(self) -> Op:
        return self._like(self.zipf.draw())

    def _viral(self) -> Op:
        if self.rng.random() < self.p.viral_share:
            return self._like(1)
        return self._like(self.rng.randint(2, self.p.items))

    def _feed(self) -> Op:
        items = [{"item_type": "post", "item_id": self.zipf.draw()} for _ in range(self.p.feed_size)]
        user = self.rng.randint(1, self.p.users)
        return "feed", (http_request("/v1/counts", {"items": items, "counters": ["like"],
                                                    "user_id": user}),)

    def _counts(self) -> Op:
        """The counts half of a feed alone: one batch read of feed_size Zipf-drawn items."""
        items = [{"item_type": "post", "item_id": self.zipf.draw()} for _ in range(self.p.feed_size)]
        return "counts", (http_request("/v1/counts", {"items": items, "counters": ["like"]}),)

    def _mixed(self) -> Op:
        if self.rng.random() < self.p.read_share:
            items = [{"item_type": "post", "item_id": self.zipf.draw()} for _ in range(10)]
            return "read", (http_request("/v1/counts", {"items": items, "counters": ["like"]}),)
        if self.recent and self.rng.random() < self.p.retry_share:
            _kind, reqs = self.rng.choice(self.recent)
            return "retry", reqs
        op = self._like(self.zipf.draw())
        self.recent.append(op)
        return op

    def _incr(self) -> Op:
        body: dict[str, Any] = {"item_type": "post", "item_id": self.zipf.draw(), "n": 1}
        if self.rng.random() < self.p.keyed_share:
            body["idempotency_key"] = f"w{self.worker}-{self.seq}"
        return "incr", (http_request("/v1/counters/view/incr", body),)

    def _bulk(self) -> Op:
        """What a service caller batching with ``AsyncTally.batcher`` sends: many likes at once."""
        ops = []
        for _ in range(self.p.bulk_size):
            self.seq += 1
            item = 1 if self.rng.random() < self.p.viral_share else self.rng.randint(2, self.p.items)
            ops.append({"op": "like", "user_id": self._fresh_user(), "item_type": "post",
                        "item_id": item})
        return "bulk", (http_request("/v1/bulk", {"ops": ops}),)


PRESETS: dict[str, str] = {
    "uniform": "likes by new users on items drawn uniformly from the item space",
    "zipf": "likes by new users on items drawn by Zipf popularity (s=1.0) over the item space",
    "viral": "likes where one item receives viral_share (40%) of all likes, the rest uniform",
    "feed": "feed reads: counts of 50 Zipf-drawn items and has-liked for the same 50, one request",
    "counts": "batch count reads: counts of 50 Zipf-drawn items in one request",
    "mixed": "80% reads (counts of 10 items), 20% likes of which 5% repeat an earlier like",
    "incr": "event counter increments (views), 20% with an idempotency key",
    "bulk": f"viral likes, bulk_size ({BATCHER_MAX_OPS}) per /v1/bulk request, as a batching client "
            "sends them",
}

