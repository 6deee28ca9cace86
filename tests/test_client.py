"""The async client over the in-process app (the blocking one is exercised by the CLI tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tally.client import AsyncTally, FeedItem, IncrResult, TallyAPIError, ToggleResult
from tests.helpers import runtime_of

pytestmark = pytest.mark.anyio


@pytest.fixture
async def tally(client: httpx.AsyncClient) -> AsyncIterator[AsyncTally]:
    t = AsyncTally()
    await t.http.aclose()
    t.http = client  # same requests and parsing, over the ASGI transport
    yield t


async def test_round_trip(tally: AsyncTally, client: httpx.AsyncClient) -> None:
    assert await tally.like(1, "post", 5) == ToggleResult(state=True, changed=True, count=1)
    assert await tally.like("1", "post", "5") == ToggleResult(state=True, changed=False, count=1)
    assert (await tally.set(2, "post", 5, "save", region="eu")).count == 1
    assert await tally.unlike(1, "post", 5) == ToggleResult(state=False, changed=True, count=0)
    assert await tally.incr("view", "post", 5, 2, "k", user=3) == IncrResult(True, 2)
    assert await tally.incr("view", "post", 5, 2, "k") == IncrResult(False, 2)
    results = await tally.bulk([{"op": "like", "user_id": 9, "item_type": "post", "item_id": 5}])
    assert results == [{"changed": True, "count": 1, "state": True}]
    await runtime_of(client).aggregator.drain()
    assert await tally.count("post", 5) == 1
    assert await tally.counts([("post", 5), ("reel", 1)], ["save", "view"]) == [
        {"save": 1, "view": 2}, {"save": 0, "view": 0}]
    assert await tally.has(9, [("post", 5), ("post", 6)]) == [True, False]
    assert await tally.has(2, [("post", 5)], "save") == [True]
    assert await tally.feed(9, [("post", 5), ("post", 6)], ["like", "view"]) == [
        FeedItem({"like": 1, "view": 2}, {"like": True}),
        FeedItem({"like": 0, "view": 0}, {"like": False})]
    lines = await tally.reconcile([("post", 5)], repair=False)
    assert lines == [{"checked": 2, "done": True, "drifts": []}]


async def test_errors_carry_the_servers_answer(tally: AsyncTally) -> None:
    with pytest.raises(TallyAPIError) as exc:
        await tally.like(True, "post", 1)  # bool is an int to the type checker, not to the API
    assert (exc.value.status, exc.value.code, exc.value.field) == (422, "invalid", "user_id")
    with pytest.raises(TallyAPIError) as exc:
        await tally.incr("like", "post", 1)
    assert exc.value.field == "counter" and "422 invalid" in str(exc.value)
    with pytest.raises(TallyAPIError) as exc:
        await tally.reconcile([])
    assert exc.value.field == "items"
