"""Request and response bodies of the HTTP API, as msgspec structs (they also make the OpenAPI
document, so what is decoded and what is documented cannot drift apart).

Requests are decoded straight from the body bytes, one validation pass: types are strict (no
booleans or floats as ids, no strings as numbers) and unknown fields are refused. The service then
checks what a type cannot say (id range and characters, known item types and counters, limits),
so the API and the CLI share one validation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

Id = Annotated[int | str, Meta(description="An int64 or a string id of 1-64 characters "
                                           "[A-Za-z0-9_.:-]", examples=[42, "u_123"])]
Region = Annotated[str | None, Meta(description="Region for rollups; defaults to the server's")]


class _Request(Struct, forbid_unknown_fields=True):
    pass


class ToggleRequest(_Request):
    user_id: Id
    item_type: Annotated[str, Meta(examples=["post"])]
    item_id: Id
    region: Region = None


class ToggleResponse(Struct):
    counter: str
    item_type: str
    item_id: str
    user_id: str
    state: Annotated[bool, Meta(description="The user's state after this request")]
    changed: Annotated[bool, Meta(description="False when the request repeated the current state")]
    count: Annotated[int, Meta(description="The item's count, including this change")]


class IncrRequest(_Request):
    item_type: str
    item_id: Id
    n: Annotated[int, Meta(ge=1)] = 1
    idempotency_key: Annotated[str | None, Meta(
        description="A repeat within the counter's window adds nothing (at most 128 characters)")
    ] = None
    user_id: Id | None = None
    region: Region = None


class IncrResponse(Struct):
    counter: str
    item_type: str
    item_id: str
    applied: Annotated[bool, Meta(description="False when the idempotency key was seen before")]
    count: int


class ItemRef(_Request):
    item_type: str
    item_id: Id


class ItemCounts(Struct):
    item_type: str
    item_id: str
    counts: dict[str, int]


class BatchItemCounts(Struct, omit_defaults=True):
    item_type: str
    item_id: str
    counts: dict[str, int]
    has: Annotated[dict[str, bool] | None, Meta(
        description="Only when the request names a user_id: whether that user has set each "
                    "requested toggle counter (liked, saved) on this item")] = None


class CountsRequest(_Request):
    items: list[ItemRef]
    counters: Annotated[list[str] | None, Meta(description="Default: every counter")] = None
    user_id: Annotated[Id | None, Meta(description="The viewer: each result then also says which "
                                                   "of the toggle counters this user has set, so "
                                                   "a feed needs one request, not two")] = None


class CountsResponse(Struct):
    results: list[BatchItemCounts]


class HasRequest(_Request):
    user_id: Id
    items: list[ItemRef]
    counter: str = "like"


class HasItem(Struct):
    item_type: str
    item_id: str
    on: bool


class HasResponse(Struct):
    counter: str
    user_id: str
    results: list[HasItem]


class BulkRequest(_Request):
    ops: Annotated[list[dict[str, Any]], Meta(
        description="Each: {op: set|clear|like|unlike|incr, counter, item_type, item_id, user_id, "
                    "n, idempotency_key, region}; the service checks every one before any is "
                    "written",
        examples=[[{"op": "like", "user_id": 1, "item_type": "post", "item_id": 7}]])]


class BulkResult(Struct):
    changed: bool
    count: int
    state: bool | None = None


class BulkResponse(Struct):
    results: list[BulkResult]


class ReconcileRequest(_Request):
    items: Annotated[list[ItemRef] | None, Meta(description="Default: every item")] = None
    repair: Annotated[bool, Meta(description="Write the recounts; without it (false, the "
                                             "default) a dry run that only reports drift")] = False


class ReconcileProgress(Struct):
    """One line of the NDJSON stream."""

    checked: int
    done: bool
    drifts: list[dict[str, Any]]


class RollupResponse(Struct):
    counter: str
    item_type: str
    dimension: Literal["day", "region"]
    buckets: dict[str, int]


class HotItem(Struct):
    item: str
    estimate: int
    error: int


class HotResponse(Struct):
    total: int
    items: list[HotItem]


class Readiness(Struct):
    status: Literal["ready", "unavailable"]


class Health(Struct):
    status: Literal["ok"]


class ErrorDetail(Struct, omit_defaults=True):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(Struct):
    error: ErrorDetail


ENCODER = msgspec.json.Encoder()


def counts_json(items: Sequence[str], counts: Mapping[str, Sequence[int]],
                has: Mapping[str, Sequence[bool]] | None) -> bytes:
    """A ``CountsResponse``, byte for byte as ``ENCODER`` writes it, from the service's columns
    (``items`` canonical ``type:id`` keys; each counter's counts, and with a viewer each toggle's
    flags, in the items' order). A feed's answer holds fifty entries, and building a struct and
    two dicts for each cost more than the rest of the answer: here each entry is one format.
    Nothing in it needs escaping: item types and counter names match ``[a-z][a-z0-9_]*``, ids
    ``[A-Za-z0-9_.:-]`` (``tally.core.model``), and a type never holds ``:``, so replacing the
    key's first ``:`` splits it into the type and the id."""
    heads = ['{"item_type":"' + key.replace(":", '","item_id":"', 1) + '","counts":{'
             for key in items]
    numbers = _members([[f'"{c}":{n}' for n in col] for c, col in counts.items()], len(items))
    if has is None:
        entries = [f"{head}{n}}}}}" for head, n in zip(heads, numbers, strict=True)]
    else:
        columns = []
        for c, col in has.items():
            off, on = f'"{c}":false', f'"{c}":true'
            columns.append([on if f else off for f in col])
        flags = _members(columns, len(items))
        entries = [f'{head}{n}}},"has":{{{f}}}}}'
                   for head, n, f in zip(heads, numbers, flags, strict=True)]
    return ('{"results":[' + ",".join(entries) + "]}").encode()


def _members(columns: list[list[str]], n: int) -> list[str]:
    """Each item's object members, joined, from one list of members per counter."""
    if len(columns) == 1:
        return columns[0]
    return [",".join(t) for t in zip(*columns, strict=True)] if columns else [""] * n
