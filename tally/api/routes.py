"""HTTP endpoints. Each is a thin translation between JSON and the service layer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from tally.api import schemas as s
from tally.core.errors import BadJson, InvalidInput
from tally.core.model import OpResult, canonical_id, split_item
from tally.runtime import AppRuntime

NOT_A_JSON_OBJECT = "request body must be a JSON object sent as Content-Type: application/json"
_BULK_FIELDS = frozenset(s.BulkRequest.model_fields)
_COUNTS_FIELDS = frozenset(s.CountsRequest.model_fields)
_HAS_FIELDS = frozenset(s.HasRequest.model_fields)
_ITEM_FIELDS = frozenset(s.ItemRef.model_fields)


def _json(body: object) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


async def _json_object(request: Request, fields: frozenset[str]) -> dict[str, Any]:
    """The body as a JSON object with only ``fields``, parsed by orjson. For /v1/bulk, where the
    framework's parse (stdlib json, then a validated copy of every operation) and its response
    models cost a third of the event loop, and for the batch reads of a feed (a seventh of it);
    the service validates each operation and item anyway.
    Content types follow the framework's rule: JSON, or none at all."""
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype and ctype != "application/json" and not (ctype.startswith("application/")
                                                       and ctype.endswith("+json")):
        raise InvalidInput(NOT_A_JSON_OBJECT, "body")
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise BadJson("request body is not valid JSON", "body") from None
    if not isinstance(body, dict):
        raise InvalidInput(NOT_A_JSON_OBJECT, "body")
    if extra := body.keys() - fields:
        raise InvalidInput("extra inputs are not permitted", min(extra))
    return body


def _item_refs(raw: Any, field: str = "items") -> list[tuple[Any, Any]]:
    """(item_type, item_id) of each ``{item_type, item_id}`` object; the service checks both."""
    if not isinstance(raw, list):
        raise InvalidInput("items must be a list of {item_type, item_id} objects", field)
    refs: list[tuple[Any, Any]] = []
    for n, ref in enumerate(raw):
        if type(ref) is not dict:
            raise InvalidInput("each item must be an object {item_type, item_id}", f"{field}[{n}]")
        if len(ref) > 2 and (extra := ref.keys() - _ITEM_FIELDS):
            raise InvalidInput("extra inputs are not permitted", f"{field}[{n}].{min(extra)}")
        refs.append((ref.get("item_type"), ref.get("item_id")))
    return refs


def _documented(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a body the handler parses itself: the model still documents it."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()}}}}


def build_router(rt: AppRuntime) -> APIRouter:  # noqa: C901 (one small closure per endpoint)
    svc = rt.service
    if svc is None:
        raise ValueError(f"role {rt.settings.role!r} serves no API; use ops_router")
    r = APIRouter(strict_content_type=False)

    async def toggle(counter: str, body: s.ToggleRequest, on: bool) -> s.ToggleResponse:
        op = svc.toggle_op(counter, body.item_type, body.item_id, body.user_id, on, body.region)
        (res,) = await svc.write([op])
        item_type, item_id = split_item(op.item)
        return s.ToggleResponse(counter=op.counter, item_type=item_type, item_id=item_id,
                                user_id=op.user, state=on, changed=res.changed, count=res.count)

    @r.post("/v1/like", tags=["write"], summary="Like an item (idempotent)")
    async def like(body: s.ToggleRequest) -> s.ToggleResponse:
        return await toggle("like", body, True)

    @r.post("/v1/unlike", tags=["write"], summary="Unlike an item (idempotent)")
    async def unlike(body: s.ToggleRequest) -> s.ToggleResponse:
        return await toggle("like", body, False)

    @r.post("/v1/counters/{counter}/set", tags=["write"], summary="Turn a toggle counter on")
    async def set_toggle(counter: str, body: s.ToggleRequest) -> s.ToggleResponse:
        return await toggle(counter, body, True)

    @r.post("/v1/counters/{counter}/clear", tags=["write"], summary="Turn a toggle counter off")
    async def clear_toggle(counter: str, body: s.ToggleRequest) -> s.ToggleResponse:
        return await toggle(counter, body, False)

    @r.post("/v1/counters/{counter}/incr", tags=["write"], summary="Add to an event counter")
    async def incr(counter: str, body: s.IncrRequest) -> s.IncrResponse:
        op = svc.incr_op(counter, body.item_type, body.item_id, body.n, body.idempotency_key,
                         body.user_id, body.region)
        (res,) = await svc.write([op])
        item_type, item_id = split_item(op.item)
        return s.IncrResponse(counter=op.counter, item_type=item_type, item_id=item_id,
                              applied=res.changed, count=res.count)

    @r.post("/v1/bulk", tags=["write"], summary="Up to max_bulk_ops operations, all or nothing",
            response_model=s.BulkResponse, openapi_extra=_documented(s.BulkRequest))
    async def bulk(request: Request) -> Response:
        body = await _json_object(request, _BULK_FIELDS)
        ops = body.get("ops")
        if not isinstance(ops, list):
            raise InvalidInput("ops must be a list of operations", "ops")
        results: list[OpResult] = await svc.write(svc.bulk_ops(ops))
        return _json({"results": [{"changed": x.changed, "count": x.count, "state": x.state}
                                  for x in results]})

    @r.get("/v1/items/{item_type}/{item_id}/counts", tags=["read"], summary="Counts of one item")
    async def item_counts(item_type: str, item_id: str,
                          counter: list[str] | None = Query(None)) -> s.ItemCounts:
        items = svc.items([(item_type, item_id)])
        (counts,) = await svc.counts(items, svc.counter_names(counter, "counter"))
        return s.ItemCounts(item_type=item_type, item_id=split_item(items[0])[1], counts=counts)

    # The batch reads build their answers as plain dicts serialised by orjson: validating 50 response
    # models per request cost more CPU than the read itself. The models still document the answer.
    @r.post("/v1/counts", tags=["read"],
            summary="Counts of a batch of items (a feed), and the viewer's likes if named",
            response_model=s.CountsResponse, openapi_extra=_documented(s.CountsRequest))
    async def batch_counts(request: Request) -> Response:
        body = await _json_object(request, _COUNTS_FIELDS)
        names = body.get("counters")
        if names is not None and not isinstance(names, list):
            raise InvalidInput("counters must be a list of counter names", "counters")
        viewer = body.get("user_id")
        if viewer is not None:
            viewer = canonical_id(viewer, "user_id")
        items = svc.items(_item_refs(body.get("items")))
        counters = svc.counter_names(names)
        counts = await svc.counts(items, counters)
        results = [{"item_type": t, "item_id": i, "counts": c}
                   for (t, i), c in zip(map(split_item, items), counts, strict=True)]
        if viewer is not None:
            states = await svc.states(viewer, items, counters)
            for n, result in enumerate(results):
                result["has"] = {name: flags[n] for name, flags in states.items()}
        return _json({"results": results})

    @r.post("/v1/has", tags=["read"], summary="Has the user set this toggle, for many items",
            response_model=s.HasResponse, openapi_extra=_documented(s.HasRequest))
    async def has_many(request: Request) -> Response:
        body = await _json_object(request, _HAS_FIELDS)
        counter, user = body.get("counter", "like"), canonical_id(body.get("user_id"), "user_id")
        items = svc.items(_item_refs(body.get("items")))
        flags = await svc.has(counter, user, items)
        return _json({"counter": counter, "user_id": user, "results": [
            {"item_type": t, "item_id": i, "on": f}
            for (t, i), f in zip(map(split_item, items), flags, strict=True)]})

    @r.get("/v1/has/{counter}/{user_id}/{item_type}/{item_id}", tags=["read"],
           summary="Has the user set this toggle on one item")
    async def has_one(counter: str, user_id: str, item_type: str, item_id: str) -> s.HasItem:
        items = svc.items([(item_type, item_id)])
        (flag,) = await svc.has(counter, user_id, items)
        return s.HasItem(item_type=item_type, item_id=split_item(items[0])[1], on=flag)

    @r.get("/v1/rollups/{counter}/{item_type}/{dimension}", tags=["read"],
           summary="A counter's totals per day or per region, for one item type")
    async def rollups(counter: str, item_type: str, dimension: str) -> s.RollupResponse:
        buckets = await svc.rollups(counter, item_type, dimension)
        return s.RollupResponse(counter=counter, item_type=item_type,
                                dimension=dimension,  # type: ignore[arg-type]
                                buckets=buckets)

    @r.get("/v1/admin/hot", tags=["admin"], summary="Items the heavy-hitter sketch sees as hot")
    async def hot() -> s.HotResponse:
        return s.HotResponse(total=rt.hot.total, items=[
            s.HotItem(item=k, estimate=c, error=e) for k, c, e in rt.hot.top()])

    @r.post("/v1/admin/reconcile", tags=["admin"],
            summary="Recount from the toggle records; streams NDJSON progress lines")
    async def reconcile(body: s.ReconcileRequest) -> StreamingResponse:
        items = None if body.items is None else svc.items(
            [(i.item_type, i.item_id) for i in body.items])
        if items is not None and not items:
            raise InvalidInput("items, when given, must name at least one item", "items")

        async def lines() -> AsyncIterator[bytes]:
            async for p in svc.reconcile(items, body.repair):
                yield orjson.dumps({"checked": p.checked, "done": p.done, "drifts": [
                    {"counter": d.counter, "item": d.item, "stored": d.stored,
                     "actual": d.actual} for d in p.drifts]}) + b"\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    r.include_router(ops_router(rt))
    return r


def ops_router(rt: AppRuntime) -> APIRouter:
    """Liveness, readiness and metrics: served by every process, whatever its role."""
    r = APIRouter()

    @r.get("/healthz", tags=["ops"], summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @r.get("/readyz", tags=["ops"], summary="Readiness: this process's stores and work answer")
    async def readyz() -> Response:
        ready, detail = await rt.readiness()
        return Response(orjson.dumps({"status": "ready" if ready else "unavailable", **detail}),
                        200 if ready else 503, media_type="application/json")

    @r.get("/metrics", tags=["ops"], summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(rt.metrics.render(), media_type="text/plain; version=0.0.4")

    return r
