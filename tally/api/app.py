"""The ASGI application: the route table, the runtime's lifespan, the OpenAPI document."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any, Protocol

from tally.api import schemas as s
from tally.api.auth import Guard, KeyFile, load_admin_token
from tally.api.http import HttpApp, HttpMetrics, Request, Response, Route, Router
from tally.api.limits import Limiter
from tally.api.openapi import DOCS_ASSETS, docs_asset, docs_html, openapi
from tally.api.routes import api_routes, ops_routes
from tally.api.server import BODY_TIMEOUT_S
from tally.bootstrap import build_for
from tally.core.bucket import Rate
from tally.gctune import tune_gc
from tally.metrics import watch_gc, watch_loop_lag
from tally.runtime import AppRuntime, cancel_all
from tally.settings import Settings

KEYS_POLL_S = 2.0


def _asset(name: str, media: bytes) -> Route:
    """A Swagger UI file, read once when first asked for."""
    cached: list[bytes] = []

    async def serve(req: Request) -> Response:
        if not cached:
            cached.append(docs_asset(name))
        return Response(cached[0], media_type=media)

    return Route("GET", f"/docs/{name}", serve, access="public")


class Companions(Protocol):
    """Processes that serve beside this one (``tally.api.processes``): started once the runtime
    is up, stopped before it stops."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class TallyApp(HttpApp):
    """The API of one process; ``runtime`` is what it serves (also as ``state.runtime``)."""

    def __init__(self, rt: AppRuntime, routes: list[Route], owns_process: bool) -> None:
        self.runtime = rt
        self.state = SimpleNamespace(runtime=rt)
        self.owns_process = owns_process
        self.others: Companions | None = None
        self._background: list[asyncio.Task[None]] = []
        self._unwatch_gc: Any = None
        self._openapi: bytes | None = None
        documented = list(routes)

        async def spec(req: Request) -> bytes:
            if self._openapi is None:
                self._openapi = s.ENCODER.encode(openapi(documented, rt.settings))
            return self._openapi

        async def docs(req: Request) -> Response:
            return Response(docs_html(), media_type=b"text/html; charset=utf-8")

        routes = [*routes, Route("GET", "/openapi.json", spec, access="public"),
                  Route("GET", "/docs", docs, access="public"),
                  *(_asset(name, media) for name, media in DOCS_ASSETS.items())]
        st = rt.settings
        keys = KeyFile(st.api_keys_file) if st.api_keys_file else None
        self.keys = keys
        limiter = Limiter(Rate.per_second(st.rate_per_key), Rate.per_second(st.rate_per_user),
                          rt.metrics.registry, shared=getattr(rt, "rate_buckets", None))
        super().__init__(Router(routes), HttpMetrics(rt.metrics.requests, rt.metrics.latency),
                         st.max_body_bytes, self._start, self._stop,
                         Guard(load_admin_token(st.admin_token_file), keys), limiter,
                         BODY_TIMEOUT_S)

    async def _start(self) -> None:
        await self.runtime.start()
        if self.others is not None:
            await self.others.start()
        if self.owns_process:
            tune_gc()
        self._background = [asyncio.create_task(watch_loop_lag(self.runtime.metrics,
                                                              role=self.runtime.process),
                                                name="tally-loop-lag")]
        if self.guard is not None:
            self.guard.announce(self.runtime.settings.host)
        if self.limiter is not None:
            self.limiter.announce()
        if self.keys is not None:
            self._background.append(asyncio.create_task(self._watch_keys(), name="tally-keys"))
            if self.owns_process:
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.keys.refresh)
        self._unwatch_gc = watch_gc(self.runtime.metrics)

    async def _watch_keys(self) -> None:
        """Re-reads the keys file when it changes: a revoked key stops working within
        KEYS_POLL_S, without a restart or a signal."""
        assert self.keys is not None
        while True:
            await asyncio.sleep(KEYS_POLL_S)
            await asyncio.to_thread(self.keys.refresh)

    async def _stop(self) -> None:
        if self._unwatch_gc is not None:
            self._unwatch_gc()
            self._unwatch_gc = None
        await cancel_all(self._background)
        if self.others is not None:
            await self.others.stop()
        await self.runtime.stop()

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[TallyApp]:
        """Start-up and shutdown around a block, for tests and for embedding in another server."""
        await self._start()
        try:
            yield self
        finally:
            await self._stop()


def create_app_from_env() -> TallyApp:
    """For worker processes: settings from $TALLY_CONFIG and TALLY_* variables."""
    from tally.api.server import GuardedHttpTools
    from tally.settings import load

    settings = load()
    GuardedHttpTools.configure(settings)  # this worker process's connection guards
    return create_app(settings, owns_process=True)


def create_app(settings: Settings | None = None, runtime: AppRuntime | None = None, *,
               owns_process: bool = False) -> TallyApp:
    """`owns_process` is for `tally serve`: only then is the garbage collector tuned, since
    freezing is process-wide (an app embedded in a test run or another service must leave the
    host's collector, and what relies on `gc.get_referrers`, as it found them)."""
    rt = runtime or build_for(settings or Settings())
    routes = api_routes(rt) if rt.service is not None else ops_routes(rt)
    return TallyApp(rt, routes, owns_process)
