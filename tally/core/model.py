"""Domain values: ids, counters, operations, change events and results.

Ids are kept as canonical strings: an int64 becomes its decimal text, so 42 and "42" name the same
user or item. Item keys are stored as ``"type:id"``; a type never holds ``:``, so the split is exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from tally.core.errors import InvalidInput

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Most one increment may add: counts are int64 sums, and an n near INT64_MAX would overflow them
# (SQLite then turns the sum into a float, and the count can no longer be read).
MAX_INCR = 1_000_000_000
_ID_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")


def canonical_id(value: Any, field: str) -> str:
    """An int64 or a string of 1-64 characters from [A-Za-z0-9_.:-], as text; else InvalidInput."""
    if isinstance(value, bool):
        raise InvalidInput("must be an int64 or a string id, not a boolean", field)
    if isinstance(value, float) and value.is_integer():  # 7.0 is 7, as JSON Schema has it
        value = int(value)
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise InvalidInput("integer id is outside the int64 range", field)
        return str(value)
    if isinstance(value, str):
        if _ID_RE.fullmatch(value):
            return value
        raise InvalidInput("string id must be 1-64 characters from [A-Za-z0-9_.:-]", field)
    raise InvalidInput(f"must be an int64 or a string id, not {type(value).__name__}", field)


class Kind(StrEnum):
    TOGGLE = "toggle"
    EVENT = "event"


@dataclass(frozen=True)
class Counter:
    name: str
    kind: Kind
    dedupe_window_s: int = 86_400


def validate_item_types(types: list[str]) -> None:
    for t in types:
        if not isinstance(t, str) or not _NAME_RE.fullmatch(t):
            raise InvalidInput(f"item type {t!r} must match [a-z][a-z0-9_]{{0,31}}", "item_types")
    if not types:
        raise InvalidInput("at least one item type is needed", "item_types")


def validate_counter_configs(raw: list[dict[str, Any]]) -> None:
    seen: set[str] = set()
    for entry in raw:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise InvalidInput(f"counter name {name!r} must match [a-z][a-z0-9_]{{0,31}}", "counters")
        if entry.get("kind") not in ("toggle", "event"):
            raise InvalidInput(f"counter {name}: kind must be 'toggle' or 'event'", "counters")
        if name in seen:
            raise InvalidInput(f"counter {name} is defined twice", "counters")
        seen.add(name)


class Schema:
    """The configured counters and item types; validates names that arrive in requests."""

    def __init__(self, counters: list[Counter], item_types: list[str]) -> None:
        self.counters = {c.name: c for c in counters}
        self.item_types = frozenset(item_types)
        self.toggles = [c.name for c in counters if c.kind is Kind.TOGGLE]

    def counter(self, name: Any, field: str = "counter", kind: Kind | None = None) -> Counter:
        c = self.counters.get(name) if isinstance(name, str) else None
        if c is None:
            raise InvalidInput(f"unknown counter {name!r}; known: {sorted(self.counters)}", field)
        if kind is not None and c.kind is not kind:
            raise InvalidInput(f"counter {name!r} is a {c.kind.value} counter, not {kind.value}",
                               field)
        return c

    def item(self, item_type: Any, item_id: Any, prefix: str = "") -> str:
        if not isinstance(item_type, str) or item_type not in self.item_types:
            raise InvalidInput(f"unknown item type {item_type!r}; known: {sorted(self.item_types)}",
                               f"{prefix}item_type")
        try:
            return f"{item_type}:{canonical_id(item_id, 'item_id')}"
        except InvalidInput as exc:
            exc.within(prefix)
            raise


def split_item(item: str) -> tuple[str, str]:
    item_type, _, item_id = item.partition(":")
    return item_type, item_id


# Operations and results are created once per like on the hot path: plain slotted dataclasses,
# because a frozen one's __init__ sets each field through object.__setattr__ (2.3 vs 1.0 us here).
@dataclass(slots=True)
class ToggleOp:
    """Set (on=True) or clear a user's toggle on an item."""

    counter: str
    item: str
    user: str
    on: bool
    region: str


@dataclass(slots=True)
class IncrOp:
    """Add n to an event counter; a repeated idempotency key within its window adds nothing."""

    counter: str
    item: str
    n: int
    region: str
    idempotency_key: str | None = None
    user: str | None = None
    dedupe_window_s: int = 86_400


Op = ToggleOp | IncrOp


@dataclass(slots=True)
class OpResult:
    changed: bool
    count: int
    state: bool | None = None  # toggles only
    seq: int | None = None  # change-log position when changed


@dataclass(frozen=True, slots=True)
class Event:
    """One change-log entry: a real state change or an accepted increment."""

    seq: int
    counter: str
    item: str
    user: str | None
    delta: int
    ts: float
    region: str
    source: str = "local"  # the log (shard) that numbered it; seq is unique within a source


CountKey = tuple[str, str]  # (counter, item)
