"""The read path feeds the heavy-hitter sketch a random sample; a viral key must still lead it."""

from __future__ import annotations

import pytest

from tally.core.hotkeys import SpaceSaving
from tally.core.lru import LRU
from tally.core.model import CountKey
from tally.service.reads import CountReader

pytestmark = pytest.mark.anyio


class _Counts:
    async def get(self, keys: list[CountKey]) -> dict[CountKey, int]:
        return {k: 1 for k in keys}


async def test_sampled_sketch_still_finds_the_viral_item() -> None:
    hot = SpaceSaving(16)
    cache: LRU[CountKey, int] = LRU(10, 0.0)  # nothing stays cached: every read is a fetch
    reader = CountReader(_Counts(), cache, hot, sample=8)  # type: ignore[arg-type]
    for n in range(400):
        feed = [("like", "post:viral")] + [("like", f"post:{n}-{i}") for i in range(9)]
        assert await reader.get(feed) == [1] * len(feed)
    (top, estimate, _err), *_ = hot.top(1)
    assert top == "post:viral"
    assert 400 * 0.5 <= estimate <= 400 * 2  # 400 true reads, sampled 1 in 8, weighted 8
    assert hot.total % 8 == 0  # each sampled read counts for 8
