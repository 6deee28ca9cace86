"""The read path feeds the heavy-hitter sketch a random sample; a viral key must still lead it."""

from __future__ import annotations

import pytest

from tally.core.hotkeys import SpaceSaving
from tally.core.lru import LRU
from tally.core.model import CountKey
from tally.service.reads import HOT_SAMPLE, REPORT_SAMPLE, CountReader

pytestmark = pytest.mark.anyio


class _Counts:
    async def get(self, keys: list[CountKey]) -> dict[CountKey, int]:
        return {k: 1 for k in keys}


@pytest.mark.parametrize("sample, feeds", [(HOT_SAMPLE, 400), (REPORT_SAMPLE, 4000)])
async def test_sampled_sketch_still_finds_the_viral_item(sample: int, feeds: int) -> None:
    hot = SpaceSaving(16)
    cache: LRU[CountKey, int] = LRU(10, 0.0)  # nothing stays cached: every read is a fetch
    reader = CountReader(_Counts(), cache, hot, sample=sample)  # type: ignore[arg-type]
    for n in range(feeds):
        feed = [("like", "post:viral")] + [("like", f"post:{n}-{i}") for i in range(9)]
        assert await reader.get(feed) == [1] * len(feed)
    (top, estimate, _err), *_ = hot.top(1)
    assert top == "post:viral"
    assert feeds * 0.5 <= estimate <= feeds * 2  # true reads, sampled 1 in `sample`, weighted
    assert hot.total % sample == 0  # each sampled read counts for `sample`
