from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.anyio


async def test_like_then_count(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/like", json={"user_id": 1, "item_type": "post", "item_id": 7})
    assert r.status_code == 200
    assert r.json() == {"counter": "like", "item_type": "post", "item_id": "7", "user_id": "1",
                        "state": True, "changed": True, "count": 1}
