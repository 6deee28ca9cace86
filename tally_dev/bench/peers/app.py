"""The HTTP app shared by the peers: Tally's schemas, validation and middleware, a peer's storage.

Only the like endpoints the benchmark drives exist here: like, unlike, batch counts and batch
has-liked, with the same request and response bodies as Tally's API.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

import orjson
from fastapi import FastAPI, Request
from starlette.responses import Response

from tally.api import schemas as s
from tally.api.app import NO_TELEMETRY, GuardMiddleware
from tally.bootstrap import schema_of
from tally.core.errors import LimitExceeded, TallyError
from tally.core.model import canonical_id, split_item
from tally.metrics import Metrics
from tally.settings import Settings


class PeerStore(Protocol):
    """A peer's storage: toggles of the one counter ``like`` and its counts."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def toggle(self, item: str, user: str, on: bool) -> tuple[bool, int]:
        """(changed, the item's count after this request)."""
        ...

    async def counts(self, items: Sequence[str]) -> list[int]: ...

    async def has(self, user: str, items: Sequence[str]) -> list[bool]: ...

    async def feed(self, user: str, items: Sequence[str]) -> list[tuple[int, bool]]:
        """(count, has the user liked it) per item, in one round trip to the engine."""
        ...


def peer_app(store: PeerStore, settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    schema = schema_of(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await store.start()
        try:
            yield
        finally:
            await store.close()

    app = FastAPI(lifespan=lifespan, strict_content_type=False, telemetry=NO_TELEMETRY)

    async def toggle(body: s.ToggleRequest, on: bool) -> s.ToggleResponse:
        item = schema.item(body.item_type, body.item_id)
        user = canonical_id(body.user_id, "user_id")
        changed, count = await store.toggle(item, user, on)
        item_type, item_id = split_item(item)
        return s.ToggleResponse(counter="like", item_type=item_type, item_id=item_id, user_id=user,
                                state=on, changed=changed, count=count)

    @app.post("/v1/like")
    async def like(body: s.ToggleRequest) -> s.ToggleResponse:
        return await toggle(body, True)

    @app.post("/v1/unlike")
    async def unlike(body: s.ToggleRequest) -> s.ToggleResponse:
        return await toggle(body, False)

    def items_of(refs: Sequence[s.ItemRef]) -> list[str]:
        if len(refs) > settings.max_batch_items:
            raise LimitExceeded(f"at most {settings.max_batch_items} items per request", "items")
        return [schema.item(r.item_type, r.item_id, f"items[{n}].") for n, r in enumerate(refs)]

    @app.post("/v1/counts", response_model_exclude_none=True)  # "has" only when asked, as Tally
    async def counts(body: s.CountsRequest) -> s.CountsResponse:
        items = items_of(body.items)
        if body.user_id is not None:
            rows = await store.feed(canonical_id(body.user_id, "user_id"), items)
            return s.CountsResponse(results=[
                s.BatchItemCounts(item_type=t, item_id=i, counts={"like": n}, has={"like": on})
                for (t, i), (n, on) in zip(map(split_item, items), rows, strict=True)])
        found = await store.counts(items)
        return s.CountsResponse(results=[
            s.BatchItemCounts(item_type=t, item_id=i, counts={"like": n}, has=None)
            for (t, i), n in zip(map(split_item, items), found, strict=True)])

    @app.post("/v1/has")
    async def has(body: s.HasRequest) -> s.HasResponse:
        items = items_of(body.items)
        user = canonical_id(body.user_id, "user_id")
        flags = await store.has(user, items)
        return s.HasResponse(counter="like", user_id=user, results=[
            s.HasItem(item_type=t, item_id=i, on=f)
            for (t, i), f in zip(map(split_item, items), flags, strict=True)])

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.exception_handler(TallyError)
    async def tally_error(request: Request, exc: TallyError) -> Response:
        return Response(orjson.dumps(exc.to_dict()), exc.status, media_type="application/json")

    app.add_middleware(GuardMiddleware, metrics=Metrics(), max_body=settings.max_body_bytes)
    return app
