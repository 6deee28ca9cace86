"""The service layer: turns requests into validated operations and runs them on the ports.

Validation happens here, before anything reaches a store, so bad input is rejected whole: a bulk
request with one malformed operation writes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tally.core.errors import InvalidInput, LimitExceeded
from tally.core.model import (
    INT64_MAX,
    INT64_MIN,
    MAX_INCR,
    IncrOp,
    Kind,
    Op,
    OpResult,
    Schema,
    ToggleOp,
    canonical_id,
)
from tally.service.reads import CountReader
from tally.store.ports import CountStore, Drift, LikeStore, Recounter

# Bulk operation names of toggle counters, and the state each sets.
_TOGGLE_KINDS = {"set": True, "like": True, "clear": False, "unlike": False}

ItemRef = tuple[Any, Any]  # (item_type, item_id) as they arrived


@dataclass
class Limits:
    max_batch_items: int = 500
    max_bulk_ops: int = 1000


@dataclass
class ReconcileProgress:
    checked: int
    drifts: list[Drift]
    done: bool


class CounterService:
    def __init__(self, schema: Schema, likes: LikeStore, counts: CountStore, reader: CountReader,
                 recounter: Recounter | None, region: str, limits: Limits,
                 on_write: Callable[[], None] | None = None) -> None:
        self.schema = schema
        self.likes = likes
        self.count_store = counts
        self.reader = reader
        self.recounter = recounter
        self.region = region
        self.limits = limits
        self._on_write = on_write or (lambda: None)

    # -- building operations ------------------------------------------------------------------

    def toggle_op(self, counter: Any, item_type: Any, item_id: Any, user: Any, on: bool,
                  region: Any = None) -> ToggleOp:
        c = self.schema.counter(counter, "counter", Kind.TOGGLE)
        return ToggleOp(counter=c.name, item=self.schema.item(item_type, item_id),
                        user=canonical_id(user, "user_id"), on=on, region=self._region(region))

    def incr_op(self, counter: Any, item_type: Any, item_id: Any, n: Any = 1, key: Any = None,
                user: Any = None, region: Any = None) -> IncrOp:
        c = self.schema.counter(counter, "counter", Kind.EVENT)
        if isinstance(n, float) and n.is_integer():  # 2.0 is 2, as JSON Schema has it
            n = int(n)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_INCR:
            raise InvalidInput(f"n must be an integer from 1 to {MAX_INCR:,}", "n")
        if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= 128):
            raise InvalidInput("idempotency_key must be a string of 1-128 characters",
                               "idempotency_key")
        return IncrOp(counter=c.name, item=self.schema.item(item_type, item_id), n=n,
                      region=self._region(region), idempotency_key=key,
                      user=None if user is None else canonical_id(user, "user_id"),
                      dedupe_window_s=c.dedupe_window_s)

    def _region(self, region: Any) -> str:
        if region is None:
            return self.region
        if not isinstance(region, str) or not 1 <= len(region) <= 32:
            raise InvalidInput("region must be a string of 1-32 characters", "region")
        return region

    def bulk_ops(self, raw: Sequence[Mapping[str, Any]]) -> list[Op]:
        if len(raw) > self.limits.max_bulk_ops:
            raise LimitExceeded(f"at most {self.limits.max_bulk_ops} operations per request", "ops")
        if not raw:
            raise InvalidInput("at least one operation is needed", "ops")
        ops: list[Op] = []
        for i, entry in enumerate(raw):
            try:
                ops.append(self._bulk_op(entry))
            except InvalidInput as exc:
                exc.within(f"ops[{i}].")
                raise
        return ops

    def _bulk_op(self, e: Mapping[str, Any]) -> Op:
        if type(e) is not dict and not isinstance(e, Mapping):  # JSON objects are dicts: no ABC
            raise InvalidInput("each operation must be a JSON object")
        kind = e.get("op")
        if isinstance(kind, str) and kind in _TOGGLE_KINDS:
            return self.toggle_op(e.get("counter", "like"), e.get("item_type"), e.get("item_id"),
                                  e.get("user_id"), _TOGGLE_KINDS[kind], e.get("region"))
        if kind == "incr":
            return self.incr_op(e.get("counter"), e.get("item_type"), e.get("item_id"),
                                e.get("n", 1), e.get("idempotency_key"), e.get("user_id"),
                                e.get("region"))
        raise InvalidInput("op must be one of set, clear, like, unlike, incr", "op")

    def items(self, refs: Sequence[ItemRef], field: str = "items") -> list[str]:
        if len(refs) > self.limits.max_batch_items:
            raise LimitExceeded(f"at most {self.limits.max_batch_items} items per request", field)
        items: list[str] = []
        types = self.schema.item_types
        for n, (item_type, item_id) in enumerate(refs):
            # A feed's usual item, checked here: a known type and an int64 id (``bool`` is not
            # ``int`` by type). Anything else goes through the full check, which names the field.
            if (type(item_id) is int and INT64_MIN <= item_id <= INT64_MAX
                    and type(item_type) is str and item_type in types):
                items.append(f"{item_type}:{item_id}")
                continue
            try:
                items.append(self.schema.item(item_type, item_id))
            except InvalidInput as exc:
                exc.within(f"{field}[{n}].")
                raise
        return items

    def counter_names(self, names: Sequence[Any] | None, field: str = "counters") -> list[str]:
        if not names:
            return list(self.schema.counters)
        return [self.schema.counter(n, f"{field}[{i}]").name for i, n in enumerate(names)]

    # -- running them -------------------------------------------------------------------------

    async def write(self, ops: Sequence[Op]) -> list[OpResult]:
        results = await self.likes.write(ops)
        if any(r.changed for r in results):
            self._on_write()
        return results

    async def counts(self, items: Sequence[str], counters: Sequence[str]) -> dict[str, list[int]]:
        """Each counter's counts of ``items``, a list per counter in the items' order (as
        ``states``): a feed's answer is built from them by position."""
        keys = [(c, item) for c in counters for item in items]
        values = await self.reader.get(keys)
        if values and min(values) < 0:  # a count is never shown below zero
            values = [v if v > 0 else 0 for v in values]
        n = len(items)
        return {c: values[k * n:(k + 1) * n] for k, c in enumerate(counters)}

    async def has(self, counter: Any, user: Any, items: Sequence[str]) -> list[bool]:
        c = self.schema.counter(counter, "counter", Kind.TOGGLE)
        return await self.likes.has(c.name, canonical_id(user, "user_id"), items)

    async def states(self, user: str, items: Sequence[str],
                     counters: Sequence[str]) -> dict[str, list[bool]]:
        """Whether ``user`` (a canonical id) has set each toggle among ``counters`` (known
        names), per item: what a feed shows beside the counts (liked, saved)."""
        return {name: await self.likes.has(name, user, items)
                for name in counters if self.schema.counters[name].kind is Kind.TOGGLE}

    async def rollups(self, counter: Any, item_type: Any, dimension: Any) -> dict[str, int]:
        c = self.schema.counter(counter)
        if item_type not in self.schema.item_types:
            raise InvalidInput(f"unknown item type {item_type!r}", "item_type")
        if dimension not in ("day", "region"):
            raise InvalidInput("dimension must be 'day' or 'region'", "dimension")
        return await self.count_store.rollups(c.name, item_type, dimension)

    async def reconcile(self, items: Sequence[str] | None = None, repair: bool = True,
                        chunk: int = 5000) -> AsyncIterator[ReconcileProgress]:
        """Recount toggle counters chunk by chunk, yielding progress; repairs drift if asked."""
        if self.recounter is None:
            raise InvalidInput("this backend cannot recount", "reconcile")
        after: tuple[str, str] | None = None
        checked = 0
        while True:
            part = await self.recounter.reconcile_chunk(self.schema.toggles, items, after, chunk,
                                                        repair)
            checked += part.checked
            if repair:
                self.reader.forget([(d.counter, d.item) for d in part.drifts])
            done = part.next_after is None
            yield ReconcileProgress(checked=checked, drifts=part.drifts, done=done)
            if done:
                return
            after = part.next_after
            await asyncio.sleep(0)
