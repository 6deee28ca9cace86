"""The HTTP API's values as the Python clients see them: results, the error, and the toggle body
that both the clients and the batcher build. Its own module, so ``tally.client`` and
``tally.batching`` both use it without importing each other both ways."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Id = int | str
Item = tuple[str, Id]  # (item_type, item_id)


class TallyAPIError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" (field {field})" if field else ""))
        self.status, self.code, self.message, self.field = status, code, message, field


@dataclass(frozen=True)
class ToggleResult:
    state: bool
    changed: bool
    count: int


@dataclass(frozen=True)
class IncrResult:
    applied: bool
    count: int


@dataclass(frozen=True)
class FeedItem:
    """An item as a feed shows it: its counts, and which toggles the viewer has set."""
    counts: dict[str, int]
    has: dict[str, bool]


def toggle_body(user: Id, item_type: str, item_id: Id, region: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"user_id": user, "item_type": item_type, "item_id": item_id}
    if region is not None:
        body["region"] = region
    return body
