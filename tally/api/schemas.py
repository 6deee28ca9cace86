"""Request and response bodies of the HTTP API (they also make the OpenAPI document).

Ids are ``int | str`` with strict typing (no coercion of booleans or floats); the service checks
their range and character set, so both the API and the CLI share one validation.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

Id = Annotated[StrictInt | StrictStr, Field(examples=[42, "u_123"])]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ToggleRequest(_Body):
    user_id: Id
    item_type: StrictStr = Field(examples=["post"])
    item_id: Id
    region: StrictStr | None = Field(None, description="Region for rollups; defaults to the server's")


class ToggleResponse(BaseModel):
    counter: str
    item_type: str
    item_id: str
    user_id: str
    state: bool = Field(description="The user's state after this request")
    changed: bool = Field(description="False when the request repeated the current state")
    count: int = Field(description="The item's count, including this change")


class IncrRequest(_Body):
    item_type: StrictStr
    item_id: Id
    n: StrictInt = Field(1, ge=1)
    idempotency_key: StrictStr | None = Field(
        None, max_length=128, description="A repeat within the counter's window adds nothing")
    user_id: Id | None = None
    region: StrictStr | None = None


class IncrResponse(BaseModel):
    counter: str
    item_type: str
    item_id: str
    applied: bool = Field(description="False when the idempotency key was seen before")
    count: int


class ItemRef(_Body):
    item_type: StrictStr
    item_id: Id


class ItemCounts(BaseModel):
    item_type: str
    item_id: str
    counts: dict[str, int]


class BatchItemCounts(ItemCounts):
    has: dict[str, bool] | None = Field(
        None, description="Only when the request names a user_id: whether that user has set "
                          "each requested toggle counter (liked, saved) on this item")


class CountsRequest(_Body):
    items: list[ItemRef]
    counters: list[StrictStr] | None = Field(None, description="Default: every counter")
    user_id: Id | None = Field(None, description="The viewer: each result then also says which "
                                                 "of the toggle counters this user has set, so a "
                                                 "feed needs one request, not two")


class CountsResponse(BaseModel):
    results: list[BatchItemCounts]


class HasRequest(_Body):
    user_id: Id
    counter: StrictStr = "like"
    items: list[ItemRef]


class HasItem(BaseModel):
    item_type: str
    item_id: str
    on: bool


class HasResponse(BaseModel):
    counter: str
    user_id: str
    results: list[HasItem]


class BulkRequest(_Body):
    ops: list[dict[str, Any]] = Field(
        description="Each: {op: set|clear|like|unlike|incr, counter, item_type, item_id, user_id, "
                    "n, idempotency_key, region}",
        examples=[[{"op": "like", "user_id": 1, "item_type": "post", "item_id": 7}]])


class BulkResult(BaseModel):
    changed: bool
    count: int
    state: bool | None = None


class BulkResponse(BaseModel):
    results: list[BulkResult]


class ReconcileRequest(_Body):
    items: list[ItemRef] | None = Field(None, description="Default: every item")
    repair: StrictBool = True


class RollupResponse(BaseModel):
    counter: str
    item_type: str
    dimension: Literal["day", "region"]
    buckets: dict[str, int]


class HotItem(BaseModel):
    item: str
    estimate: int
    error: int


class HotResponse(BaseModel):
    total: int
    items: list[HotItem]
