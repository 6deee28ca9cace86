"""HTTP endpoints. Each is a thin translation between a decoded struct and the service layer."""

from __future__ import annotations

from collections.abc import AsyncIterator

from tally.api import schemas as s
from tally.api.http import Request, Response, Route, decode
from tally.core.errors import InvalidInput
from tally.core.model import canonical_id, split_item
from tally.runtime import AppRuntime

_encode = s.ENCODER.encode
_COUNTER = (("counter", {"type": "array", "items": {"type": "string"}}),)


def api_routes(rt: AppRuntime) -> list[Route]:  # noqa: C901 (one small closure per endpoint)
    svc = rt.service
    if svc is None:
        raise ValueError(f"role {rt.settings.role!r} serves no API; use ops_routes")

    async def toggle(counter: str, req: Request, on: bool) -> bytes:
        body = decode(s.ToggleRequest, req)
        op = svc.toggle_op(counter, body.item_type, body.item_id, body.user_id, on, body.region)
        req.principal.check_write(op.counter)
        await req.users(op.user)
        (res,) = await svc.write([op])
        item_type, item_id = split_item(op.item)
        return _encode(s.ToggleResponse(op.counter, item_type, item_id, op.user, on, res.changed,
                                        res.count))

    async def like(req: Request) -> bytes:
        return await toggle("like", req, True)

    async def unlike(req: Request) -> bytes:
        return await toggle("like", req, False)

    async def set_toggle(req: Request) -> bytes:
        return await toggle(req.params["counter"], req, True)

    async def clear_toggle(req: Request) -> bytes:
        return await toggle(req.params["counter"], req, False)

    async def incr(req: Request) -> bytes:
        body = decode(s.IncrRequest, req)
        op = svc.incr_op(req.params["counter"], body.item_type, body.item_id, body.n,
                         body.idempotency_key, body.user_id, body.region)
        req.principal.check_write(op.counter)
        if op.user is not None:
            await req.users(op.user)
        (res,) = await svc.write([op])
        item_type, item_id = split_item(op.item)
        return _encode(s.IncrResponse(op.counter, item_type, item_id, res.changed, res.count))

    async def bulk(req: Request) -> bytes:
        body = decode(s.BulkRequest, req)
        ops = svc.bulk_ops(body.ops)
        for op in ops:
            req.principal.check_write(op.counter)
        await req.users(*(op.user for op in ops if op.user is not None))
        results = await svc.write(ops)
        return _encode(s.BulkResponse([s.BulkResult(x.changed, x.count, x.state) for x in results]))

    async def item_counts(req: Request) -> bytes:
        p = req.params
        items = svc.items([(p["item_type"], p["item_id"])])
        counts = await svc.counts(items, svc.counter_names(req.query_list("counter"), "counter"))
        return _encode(s.ItemCounts(p["item_type"], split_item(items[0])[1],
                                    {c: col[0] for c, col in counts.items()}))

    async def batch_counts(req: Request) -> bytes:
        body = decode(s.CountsRequest, req)
        viewer = None if body.user_id is None else canonical_id(body.user_id, "user_id")
        if viewer is not None:
            await req.users(viewer)
        items = svc.items([(r.item_type, r.item_id) for r in body.items])
        counters = svc.counter_names(body.counters)
        counts = await svc.counts(items, counters)
        states = None if viewer is None else await svc.states(viewer, items, counters)
        return s.counts_json(items, counts, states)

    async def has_many(req: Request) -> bytes:
        body = decode(s.HasRequest, req)
        user = canonical_id(body.user_id, "user_id")
        await req.users(user)
        items = svc.items([(r.item_type, r.item_id) for r in body.items])
        flags = await svc.has(body.counter, user, items)
        return _encode(s.HasResponse(body.counter, user, [
            s.HasItem(t, i, f) for (t, i), f in zip(map(split_item, items), flags, strict=True)]))

    async def has_one(req: Request) -> bytes:
        p = req.params
        items = svc.items([(p["item_type"], p["item_id"])])
        await req.users(canonical_id(p["user_id"], "user_id"))
        (flag,) = await svc.has(p["counter"], p["user_id"], items)
        return _encode(s.HasItem(p["item_type"], split_item(items[0])[1], flag))

    async def rollups(req: Request) -> bytes:
        p = req.params
        buckets = await svc.rollups(p["counter"], p["item_type"], p["dimension"])
        return _encode({"counter": p["counter"], "item_type": p["item_type"],
                        "dimension": p["dimension"], "buckets": buckets})

    async def hot(req: Request) -> bytes:
        return _encode(s.HotResponse(rt.hot.total, [s.HotItem(k, c, e) for k, c, e in rt.hot.top()]))

    async def reconcile(req: Request) -> Response:
        body = decode(s.ReconcileRequest, req)
        items = None if body.items is None else svc.items(
            [(i.item_type, i.item_id) for i in body.items])
        if items is not None and not items:
            raise InvalidInput("items, when given, must name at least one item", "items")

        async def lines() -> AsyncIterator[bytes]:
            async for p in svc.reconcile(items, body.repair):
                yield _encode(s.ReconcileProgress(p.checked, p.done, [
                    {"counter": d.counter, "item": d.item, "stored": d.stored, "actual": d.actual}
                    for d in p.drifts])) + b"\n"

        return Response(lines(), media_type=b"application/x-ndjson")

    toggles = "/v1/counters/{counter}"
    return [
        Route("POST", "/v1/like", like, "Like an item (idempotent)", ("write",), s.ToggleRequest,
              s.ToggleResponse),
        Route("POST", "/v1/unlike", unlike, "Unlike an item (idempotent)", ("write",),
              s.ToggleRequest, s.ToggleResponse),
        Route("POST", f"{toggles}/set", set_toggle, "Turn a toggle counter on", ("write",),
              s.ToggleRequest, s.ToggleResponse),
        Route("POST", f"{toggles}/clear", clear_toggle, "Turn a toggle counter off", ("write",),
              s.ToggleRequest, s.ToggleResponse),
        Route("POST", f"{toggles}/incr", incr, "Add to an event counter", ("write",),
              s.IncrRequest, s.IncrResponse),
        Route("POST", "/v1/bulk", bulk, "Up to max_bulk_ops operations, all or nothing",
              ("write",), s.BulkRequest, s.BulkResponse),
        Route("GET", "/v1/items/{item_type}/{item_id}/counts", item_counts, "Counts of one item",
              ("read",), None, s.ItemCounts, query=_COUNTER),
        Route("POST", "/v1/counts", batch_counts,
              "Counts of a batch of items (a feed), and the viewer's likes if named", ("read",),
              s.CountsRequest, s.CountsResponse),
        Route("POST", "/v1/has", has_many, "Has the user set this toggle, for many items",
              ("read",), s.HasRequest, s.HasResponse),
        Route("GET", "/v1/has/{counter}/{user_id}/{item_type}/{item_id}", has_one,
              "Has the user set this toggle on one item", ("read",), None, s.HasItem),
        Route("GET", "/v1/rollups/{counter}/{item_type}/{dimension}", rollups,
              "A counter's totals per day or per region, for one item type", ("read",), None,
              s.RollupResponse),
        Route("GET", "/v1/admin/hot", hot, "Items the heavy-hitter sketch sees as hot", ("admin",),
              None, s.HotResponse, access="admin"),
        Route("POST", "/v1/admin/reconcile", reconcile,
              "Recount from the toggle records; streams NDJSON progress lines", ("admin",),
              s.ReconcileRequest, s.ReconcileProgress, media_type="application/x-ndjson",
              access="admin"),
        *ops_routes(rt),
    ]


def ops_routes(rt: AppRuntime) -> list[Route]:
    """Liveness, readiness and metrics: served by every process, whatever its role."""

    async def healthz(req: Request) -> bytes:
        return b'{"status":"ok"}'

    async def readyz(req: Request) -> Response:
        ready, detail = await rt.readiness()
        return Response(_encode({"status": "ready" if ready else "unavailable", **detail}),
                        200 if ready else 503)

    async def metrics(req: Request) -> Response:
        return Response(rt.metrics.render(), media_type=b"text/plain; version=0.0.4")

    return [
        Route("GET", "/healthz", healthz, "Liveness", ("ops",), None, s.Health, access="public"),
        Route("GET", "/readyz", readyz, "Readiness: this process's stores and work answer",
              ("ops",), None, s.Readiness, access="public"),
        Route("GET", "/metrics", metrics, "Prometheus metrics", ("ops",), None, None,
              media_type="text/plain", access="admin"),
    ]
