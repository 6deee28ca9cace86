"""Ids, canonical ids, names and the Schema."""

from __future__ import annotations

from typing import Any

import pytest

from tally.core.errors import InvalidInput
from tally.core.model import (
    INT64_MAX,
    INT64_MIN,
    Counter,
    Kind,
    Schema,
    canonical_id,
    split_item,
    validate_counter_configs,
    validate_item_types,
)


def test_canonical_ids() -> None:
    assert canonical_id(42, "f") == canonical_id("42", "f") == "42"
    assert canonical_id(INT64_MAX, "f") == str(INT64_MAX)
    assert canonical_id(INT64_MIN, "f") == str(INT64_MIN)
    assert canonical_id("A-z_0.9:x", "f") == "A-z_0.9:x"
    assert canonical_id("x" * 64, "f") == "x" * 64


@pytest.mark.parametrize("bad", [INT64_MAX + 1, INT64_MIN - 1, True, False, 1.5, None, "", "x" * 65,
                                 "a b", "a/b", "é", "a\n", b"42", [1], {"a": 1}])
def test_bad_ids_name_the_field(bad: Any) -> None:
    with pytest.raises(InvalidInput) as exc:
        canonical_id(bad, "user_id")
    assert exc.value.field == "user_id"
    assert exc.value.to_dict()["error"] == {"code": "invalid", "message": exc.value.message,
                                            "field": "user_id"}


def schema() -> Schema:
    return Schema([Counter("like", Kind.TOGGLE), Counter("view", Kind.EVENT, 60)],
                  ["post", "reel"])


def test_schema_counters_and_items() -> None:
    s = schema()
    assert s.toggles == ["like"]
    assert s.counter("view").dedupe_window_s == 60
    assert s.counter("like", kind=Kind.TOGGLE).name == "like"
    assert s.item("post", 42) == s.item("post", "42") == "post:42"
    assert split_item(s.item("reel", "a:b")) == ("reel", "a:b")  # ids may hold ':'


@pytest.mark.parametrize(("call", "field"), [
    (lambda s: s.counter("nope"), "counter"),
    (lambda s: s.counter(5, "c"), "c"),
    (lambda s: s.counter("view", "ops[2].counter", Kind.TOGGLE), "ops[2].counter"),
    (lambda s: s.item("video", 1), "item_type"),
    (lambda s: s.item(None, 1, "items[3]."), "items[3].item_type"),
    (lambda s: s.item("post", 1.5, "items[3]."), "items[3].item_id"),
])
def test_schema_rejects(call: Any, field: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        call(schema())
    assert exc.value.field == field


def test_config_validation() -> None:
    validate_item_types(["post", "a_1"])
    validate_counter_configs([{"name": "like", "kind": "toggle"}, {"name": "v", "kind": "event"}])
    for types in ([], ["Post"], ["a:b"], ["1a"], [5]):
        with pytest.raises(InvalidInput):
            validate_item_types(types)  # type: ignore[arg-type]
    for counters in ([{"name": "x", "kind": "gauge"}], [{"kind": "toggle"}], ["like"],
                     [{"name": "a", "kind": "toggle"}, {"name": "a", "kind": "event"}]):
        with pytest.raises(InvalidInput):
            validate_counter_configs(counters)  # type: ignore[arg-type]
