"""The batching client: concurrent calls travel as few bulk requests, each caller gets its result."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from tally.api.app import create_app
from tally.client import AsyncTally, TallyAPIError
from tally.settings import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture
async def tally(settings: Settings) -> AsyncIterator[AsyncTally]:
    app = create_app(settings)
    async with app.lifespan(), \
            AsyncTally("http://tally", transport=httpx.ASGITransport(app=app)) as c:
        yield c


async def test_concurrent_likes_share_bulk_requests(tally: AsyncTally) -> None:
    async with tally.batcher(max_ops=50, window_ms=5) as b:
        results = await asyncio.gather(*(b.like(u, "post", 9) for u in range(200)))
        again = await b.like(7, "post", 9)
    assert all(r.changed and r.state for r in results)
    counts = sorted(r.count for r in results)
    assert counts == list(range(1, 201)), [(i + 1, c) for i, c in enumerate(counts) if i + 1 != c]
    assert not again.changed and again.count == 200
    assert b.requests <= 10  # 201 calls, at most 50 per request
    for _ in range(100):  # reads are eventually consistent: the aggregator applies the log
        if await tally.count("post", 9) == 200:
            break
        await asyncio.sleep(0.05)
    assert await tally.count("post", 9) == 200


async def test_one_invalid_call_fails_alone(tally: AsyncTally) -> None:
    async with tally.batcher(max_ops=100, window_ms=5) as b:
        calls = [b.like(1, "post", 1), b.like(2, "nosuchtype", 1), b.like(3, "post", 1),
                 b.incr("view", "post", 1, idempotency_key="k1"), b.incr("view", "post", 1,
                                                                     idempotency_key="k1")]
        out = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(out[1], TallyAPIError) and out[1].status == 422
    assert [getattr(r, "changed", None) for r in (out[0], out[2])] == [True, True]
    assert [getattr(r, "applied", None) for r in out[3:]] == [True, False]
    assert b.requests == 2  # the first was rejected whole, then resent without the bad call
