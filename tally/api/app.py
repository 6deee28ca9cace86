"""The ASGI application: routes, one error handler, body limit and request metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.telemetry import TelemetryConfig
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import tally
from tally.api import schemas as s
from tally.api.routes import NOT_A_JSON_OBJECT, build_router, ops_router
from tally.bootstrap import build_for
from tally.core.errors import TallyError
from tally.gctune import tune_gc
from tally.metrics import Metrics, watch_gc, watch_loop_lag
from tally.runtime import AppRuntime, cancel_all
from tally.settings import Settings

# Metrics are Prometheus, our own (tally.metrics). FastAPI's native OpenTelemetry hooks looked up
# the global tracer, meter and logger providers on every request: 2-3% of the event loop's
# samples under feed reads, for nothing (too little to show in server CPU per feed, which moves
# by more than that from run to run). The peers' app turns them off too: the stacks stay equal.
NO_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False,
                                 "operation_spans": False}


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body), status, media_type="application/json")


def _error(status: int, code: str, message: str, field: str | None = None) -> Response:
    err: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        err["field"] = field
    return _json(status, {"error": err})


class GuardMiddleware:
    """Refuses bodies over the limit (413) before parsing, and times every request by route."""

    def __init__(self, app: ASGIApp, metrics: Metrics, max_body: int,
                 routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body
        self.routes = routes  # to name the endpoint of a refused request, which is never routed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        replay = await self._limit(scope, receive, send_status)
        if replay is not None:
            await self.app(scope, replay, send_status)
            endpoint = getattr(scope.get("route"), "path", "unmatched")
        else:
            endpoint = _refused_route(self.routes, scope)
        self.metrics.requests.labels(endpoint, scope["method"], str(status[0])).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    async def _limit(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """Reads the body up front, so a too-large one is refused whole; replays it to the app."""
        if scope["method"] in ("GET", "HEAD"):
            return receive
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body:
                await self._too_large(scope, receive, send)
                return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return receive
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body:
                await self._too_large(scope, receive, send)
                return None
        body, sent = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        resp = _error(413, "body_too_large", f"request body is over {self.max_body} bytes", "body")
        await resp(scope, receive, send)


def _refused_route(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The route a request refused before routing (413) was sent to, so its metrics land under that
    endpoint; "body_too_large" when no route matches. Only refused requests pay for this lookup."""
    for route in routes:
        path = getattr(route, "path", None)
        if isinstance(path, str) and route.matches(scope)[0] is Match.FULL:
            return path
    return "body_too_large"


def _field(loc: tuple[Any, ...]) -> str:
    parts = [p for p in loc if p not in ("body", "query", "path")]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def create_app_from_env() -> FastAPI:
    """For uvicorn's worker processes: settings from $TALLY_CONFIG and TALLY_* variables."""
    from tally.settings import load

    return create_app(load(), owns_process=True)


def create_app(settings: Settings | None = None, runtime: AppRuntime | None = None, *,
               owns_process: bool = False) -> FastAPI:
    """`owns_process` is for `tally serve`: only then is the garbage collector tuned, since
    freezing is process-wide (an app embedded in a test run or another service must leave the
    host's collector, and what relies on `gc.get_referrers`, as it found them)."""
    rt = runtime or build_for(settings or Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await rt.start()
        if owns_process:
            tune_gc(rt.settings.gc_threshold)
        lag = asyncio.create_task(watch_loop_lag(rt.metrics), name="tally-loop-lag")
        unwatch_gc = watch_gc(rt.metrics)
        try:
            yield
        finally:
            unwatch_gc()
            await cancel_all([lag])
            await rt.stop()

    app = FastAPI(title="Tally", version=tally.__version__, lifespan=lifespan, strict_content_type=False,
                  telemetry=NO_TELEMETRY,
                  redirect_slashes=False,  # one URL per resource: "/x/" is a 404, not a redirect
                  description="Durable, idempotent like counts and other counters.")
    app.state.runtime = rt
    router = build_router(rt) if rt.service is not None else ops_router(rt)
    app.include_router(router)

    @app.post("/bench/noop", include_in_schema=False)
    async def noop(body: s.ToggleRequest) -> s.ToggleResponse:
        """Same parsing and serialisation as /v1/like, no storage: the framework's ceiling."""
        return s.ToggleResponse(counter="like", item_type=body.item_type,
                                item_id=str(body.item_id), user_id=str(body.user_id), state=True,
                                changed=True, count=1)

    @app.exception_handler(TallyError)
    async def tally_error(request: Request, exc: TallyError) -> Response:
        return _json(exc.status, exc.to_dict())

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0]
        loc = tuple(first.get("loc", ()))
        message = first.get("msg", "invalid input")
        if first.get("type") == "json_invalid":
            return _error(400, "bad_json", "request body is not valid JSON", "body")
        if loc and loc[-1] in ("int", "str"):  # a member of the int | str id union
            loc, message = loc[:-1], "must be an int64 or a string id"
        if loc == ("body",):
            message = NOT_A_JSON_OBJECT
        return _error(422, "invalid", message, _field(loc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # The framework's own refusals: a body it could not parse (e.g. JSON nested too deep
        # for the parser), an unknown path or method. They name what was wrong like ours do.
        code, field = {400: ("bad_json", "body"), 404: ("not_found", "path"),
                       405: ("method_not_allowed", "method")}.get(exc.status_code,
                                                                  ("http_error", None))
        return _error(exc.status_code, code, str(exc.detail), field)

    app.add_middleware(GuardMiddleware, metrics=rt.metrics, max_body=rt.settings.max_body_bytes,
                       routes=[*router.routes, *app.routes])
    return app
