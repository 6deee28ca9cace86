"""The feed's answer, written from columns, is byte for byte what msgspec writes from structs."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tally.api import schemas as s
from tally.core.model import split_item

names = st.from_regex(r"[a-z][a-z0-9_]{0,31}", fullmatch=True)
ids = st.from_regex(r"[A-Za-z0-9_.:\-]{1,64}", fullmatch=True) | st.integers(-2**63, 2**63 - 1)
keys = st.builds(lambda t, i: f"{t}:{i}", names, ids)


def as_structs(items: list[str], counts: dict[str, list[int]],
               has: dict[str, list[bool]] | None) -> bytes:
    return s.ENCODER.encode(s.CountsResponse([
        s.BatchItemCounts(*split_item(key), {c: col[n] for c, col in counts.items()},
                          None if has is None else {c: col[n] for c, col in has.items()})
        for n, key in enumerate(items)]))


@settings(max_examples=40)
@given(items=st.lists(keys, max_size=8), counters=st.lists(names, min_size=1, max_size=4,
                                                            unique=True),
       toggles=st.integers(0, 4), viewer=st.booleans(), data=st.data())
def test_same_bytes_as_the_structs(items: list[str], counters: list[str], toggles: int,
                                   viewer: bool, data: st.DataObject) -> None:
    n = len(items)
    counts = {c: data.draw(st.lists(st.integers(0, 2**63 - 1), min_size=n, max_size=n))
              for c in counters}
    has = ({c: data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
            for c in counters[:toggles]} if viewer else None)
    assert s.counts_json(items, counts, has) == as_structs(items, counts, has)


def test_a_feed() -> None:
    got = s.counts_json(["post:1", "reel:a:b"], {"like": [3, 0], "view": [9, 1]},
                        {"like": [True, False]})
    assert got == (b'{"results":[{"item_type":"post","item_id":"1","counts":{"like":3,"view":9},'
                   b'"has":{"like":true}},{"item_type":"reel","item_id":"a:b","counts":'
                   b'{"like":0,"view":1},"has":{"like":false}}]}')
    assert got == as_structs(["post:1", "reel:a:b"], {"like": [3, 0], "view": [9, 1]},
                             {"like": [True, False]})
