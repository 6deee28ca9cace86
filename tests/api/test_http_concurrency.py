"""Many clients liking and unliking one hot item at once, through a real server process."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest

from tests.conftest import ServerFactory
from tests.helpers import poll, recount

pytestmark = pytest.mark.anyio

USERS, OPS_PER_USER = 40, 8


async def test_hot_item_under_concurrent_toggles(server_factory: ServerFactory) -> None:
    server = server_factory()
    server.start()
    rng = random.Random(5)
    plans = {u: [rng.random() < 0.6 for _ in range(OPS_PER_USER)] for u in range(USERS)}
    errors: list[str] = []

    async def user(u: int) -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            for on in plans[u]:
                r = await c.post("/v1/like" if on else "/v1/unlike",
                                 json={"user_id": u, "item_type": "post", "item_id": "hot"})
                if r.status_code != 200:
                    errors.append(r.text)
                elif not 0 <= r.json()["count"] <= USERS or r.json()["state"] is not on:
                    errors.append(f"implausible answer {r.text}")

    async with anyio.create_task_group() as tg:
        for u in range(USERS):
            tg.start_soon(user, u)
    assert errors == []
    expected = sum(p[-1] for p in plans.values())
    assert recount(server.data_dir / "tally.db") == ({("like", "post:hot"): expected}
                                                     if expected else {})
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        async def converged() -> bool:
            r = await c.get("/v1/items/post/hot/counts", params={"counter": "like"})
            return bool(r.json()["counts"]["like"] == expected)

        await poll(converged)
        for u, p in plans.items():
            r = await c.get(f"/v1/has/like/{u}/post/hot")
            assert r.json()["on"] is p[-1], u
        metrics = (await c.get("/metrics")).text
        assert 'status="500"' not in metrics


async def test_chunked_body_over_the_limit(server_factory: ServerFactory) -> None:
    server = server_factory(env={"TALLY_MAX_BODY_BYTES": "4096"})
    server.start()

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"user_id": 1, "item_type": "post", "item_id": 7, "region": "'
        for _ in range(10):
            yield b"r" * 1000
        yield b'"}'

    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        r = await c.post("/v1/like", content=chunks(), headers={"content-type": "application/json"})
        assert r.request.headers["transfer-encoding"] == "chunked"
        assert (r.status_code, r.json()["error"]["code"]) == (413, "body_too_large")
        big = {"user_id": 1, "item_type": "post", "item_id": 7, "region": "r" * 5000}
        r = await c.post("/v1/like", json=big)
        assert (r.status_code, r.json()["error"]["field"]) == (413, "body")
        r = await c.post("/v1/like", json={"user_id": 1, "item_type": "post", "item_id": 7})
        assert (r.status_code, r.json()["count"]) == (200, 1)  # the server is fine after it
