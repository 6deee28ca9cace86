"""Fair use (issue 16): token buckets per user and per API key, 429 with Retry-After, and a
flooding user who cannot slow another user down."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from tally.api.app import create_app
from tally.bootstrap import build
from tally.settings import Settings
from tests.conftest import ServerFactory
from tests.helpers import app_client, poll_sync

pytestmark = pytest.mark.anyio


def like(user: int | str, item: int) -> dict[str, object]:
    return {"user_id": user, "item_type": "post", "item_id": item}


async def test_a_user_over_the_limit_gets_429_with_retry_after(settings: Settings) -> None:
    s = settings.replace(rate_per_user=1.0)  # bursts of 10
    async with app_client(create_app(s, build(s))) as c:
        codes = [(await c.post("/v1/like", json=like(1, n))).status_code for n in range(12)]
        assert codes == [200] * 10 + [429] * 2
        r = await c.post("/v1/like", json=like(1, 99))
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limited"
        assert (await c.post("/v1/like", json=like(2, 1))).status_code == 200  # another user
        r = await c.post("/v1/has", json={"user_id": 1, "items": [{"item_type": "post",
                                                                  "item_id": 1}]})
        assert r.status_code == 429  # reads that name the user take from the same bucket
        metrics = (await c.get("/metrics")).text
        assert 'tally_rate_limited_total{key="loopback",limit="user"} 4.0' in metrics


async def test_a_bulk_request_with_one_user_over_the_limit_takes_from_nobody(
        settings: Settings) -> None:
    """A bulk request takes a token from each user it names, all or none: one user out of
    tokens refuses it with 429 naming that user, nothing of it is written, and the other users
    keep the tokens it would have taken."""
    s = settings.replace(rate_per_user=0.2)  # bursts of 2, a token back every 5 s
    async with app_client(create_app(s, build(s))) as c:
        assert (await c.post("/v1/like", json=like(3, 1))).status_code == 200
        assert (await c.post("/v1/like", json=like(3, 2))).status_code == 200  # user 3: empty
        ops = [{"op": "like", **like(u, 9)} for u in (1, 2, 3, 4)]
        r = await c.post("/v1/bulk", json={"ops": ops})
        assert r.status_code == 429 and r.json()["error"]["field"] == "user_id"
        assert "user 3 " in r.json()["error"]["message"]
        assert (await c.get("/v1/items/post/9/counts")).json()["counts"]["like"] == 0
        for _ in range(2):  # users 1, 2 and 4 still have both their tokens
            r = await c.post("/v1/bulk", json={"ops": [o for o in ops if o["user_id"] != 3]})
            assert r.status_code == 200, r.text
        assert (await c.post("/v1/like", json=like(1, 10))).status_code == 429


async def test_a_key_over_the_limit_gets_429(settings: Settings) -> None:
    s = settings.replace(rate_per_key=0.5, rate_per_user=0.0)  # bursts of 5
    async with app_client(create_app(s, build(s))) as c:
        codes = [(await c.get("/v1/items/post/1/counts")).status_code for _ in range(7)]
        assert codes == [200] * 5 + [429] * 2
        assert (await c.get("/healthz")).status_code == 200  # public routes are not counted
        r = await c.get("/v1/items/post/1/counts")
        assert int(r.headers["retry-after"]) == 2


def _p99(c: httpx.Client, user: str, n: int) -> float:
    took = []
    for i in range(n):
        start = time.perf_counter()
        r = c.post("/v1/like", json=like(user, i))
        took.append(time.perf_counter() - start)
        assert r.status_code == 200, r.text
    took.sort()
    return took[int(n * 0.99) - 1]


FLOOD = """
import socket, sys, threading
port, seconds, pause = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
counts = {}
def one(k):
    s = socket.create_connection(("127.0.0.1", port))
    n = 0
    import time
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        body = b'{"user_id":"flood","item_type":"post","item_id":%d}' % (k * 10**6 + n)
        s.sendall(b"POST /v1/like HTTP/1.1\\r\\nhost: x\\r\\ncontent-type: application/json\\r\\n"
                  b"content-length: %d\\r\\n\\r\\n%s" % (len(body), body))
        data = b""
        while b"\\r\\n\\r\\n" not in data:
            data += s.recv(65536)
        head, _, rest = data.partition(b"\\r\\n\\r\\n")
        size = int(head.lower().split(b"content-length: ")[1].split(b"\\r\\n")[0])
        while len(rest) < size:
            rest += s.recv(65536)
        code = head.split(b" ")[1].decode()
        counts[code] = counts.get(code, 0) + 1
        n += 1
        time.sleep(pause)
threads = [threading.Thread(target=one, args=(k,)) for k in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(counts)
"""


@pytest.mark.slow
def test_a_flooding_user_leaves_another_within_twice_its_latency(
        server_factory: ServerFactory) -> None:
    """Eight connections like as one user, each a request every 10 ms (eight times the user's
    limit; from a process of their own, as a real abuser would), while another user likes one
    item at a time. The flood is refused by its bucket before it reaches the writer, so the other
    user's p99 stays within twice its p99 without the flood, measured against the real server.
    On a shared machine one p99 of 300 requests moves by 2x on its own, so the test takes the
    best of three rounds (each an unloaded and a flooded measurement back to back). A flood that
    saturates the server's CPU with refused requests is for the connection caps and the load
    balancer to stop (docs/security.md)."""
    server = server_factory(env={"TALLY_RATE_PER_USER": "100"}).start()
    ratios = []
    with httpx.Client(base_url=server.url, timeout=30) as c:
        _p99(c, "warm", 30)
        for attempt in range(3):
            unloaded = _p99(c, f"calm-{attempt}", 300)
            flood = subprocess.Popen([sys.executable, "-c", FLOOD, str(server.port), "60", "0.01"],
                                     stdout=subprocess.DEVNULL)
            try:
                before = _limited(c)
                poll_sync(lambda b=before: _limited(c) > b + 100)  # type: ignore[misc]
                loaded = _p99(c, f"busy-{attempt}", 300)
            finally:
                flood.terminate()
                flood.wait(10)
            ratios.append((loaded / unloaded, loaded, unloaded))
            if loaded <= 2 * unloaded:
                break
    print("flooded/unloaded p99 (ratio, s, s):", ratios)
    assert min(r for r, _, _ in ratios) <= 2.0, ratios


def _limited(c: httpx.Client) -> float:
    metrics = c.get("/metrics").text
    mark = 'tally_rate_limited_total{key="loopback",limit="user"} '
    return float(metrics.split(mark)[1].split()[0]) if mark in metrics else 0.0
