#!/usr/bin/env python3
"""CPU per request of the HTTP layer alone, in one process: uvicorn's protocol as ``tally serve``
configures it (``tally.api.server``) fed whole like requests through a transport that only
records, in front of ``HttpApp`` with one route that decodes the body as ``/v1/like`` does, takes
the per-user rate-limit token and answers fixed bytes. No sockets, no storage: what is left is
the parsing, the request's cycle, routing, limits, decoding, metrics and the response's bytes.

Run it from two source trees to compare a change with its base (the same interpreter and
machine, one after the other; repeat and compare medians):

    PYTHONPATH=/tmp/base .venv/bin/python scripts/bench-http-layer.py --requests 20000
    PYTHONPATH=$PWD      .venv/bin/python scripts/bench-http-layer.py --requests 20000
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import uvicorn
import uvloop
from prometheus_client import CollectorRegistry, Counter, Histogram
from uvicorn.server import ServerState

from tally.api import schemas as s
from tally.api.http import HttpApp, HttpMetrics, Request, Route, Router, decode
from tally.api.limits import Limiter
from tally.api.server import GuardedHttpTools, uvicorn_options
from tally.core.bucket import Rate
from tally.settings import Settings

ANSWER = (b'{"counter":"like","item_type":"post","item_id":"2","user_id":"1","state":true,'
          b'"changed":true,"count":1}')


class Recorder:
    """A transport that keeps what is written and says when an answer's body went out."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closing = False
        self.answered: asyncio.Future[None] | None = None

    def write(self, data: bytes) -> None:
        self.out.append(data)
        if self.answered is not None and not self.answered.done() and data.endswith(b"}"):
            self.answered.set_result(None)

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name,
                                                                                      default)

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


def build_app() -> HttpApp:
    async def like(req: Request) -> bytes:
        body = decode(s.ToggleRequest, req)
        await req.users(str(body.user_id))
        return ANSWER

    async def nothing() -> None: ...

    registry = CollectorRegistry()
    metrics = HttpMetrics(Counter("requests", "", ["e", "m", "s"], registry=registry),
                          Histogram("latency", "", ["e"], registry=registry))
    limiter = Limiter(Rate.per_second(0), Rate.per_second(Settings().rate_per_user), registry)
    return HttpApp(Router([Route("POST", "/v1/like", like)]), metrics, 1 << 20, nothing, nothing,
                   None, limiter, 10.0)


async def measure(requests: int) -> float:
    config = uvicorn.Config(build_app(), loop="uvloop", log_config=None, lifespan="off",
                            **uvicorn_options(Settings()))
    config.load()
    loop = asyncio.get_running_loop()
    protocol = GuardedHttpTools(config, ServerState(), {}, loop)
    transport = Recorder()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    bodies = (b'{"user_id":%d,"item_type":"post","item_id":%d}' % (i, i)
              for i in range(requests + 2000))
    wire = [b"POST /v1/like HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(b), b) for b in bodies]

    async def one(request: bytes) -> None:
        transport.answered = loop.create_future()
        protocol.data_received(request)
        await transport.answered
        await asyncio.sleep(0)  # the request's task finishes

    for request in wire[:2000]:  # warm up
        await one(request)
    transport.out.clear()
    start = time.process_time()
    for request in wire[2000:]:
        await one(request)
    spent = time.process_time() - start
    if len(transport.out) != requests or not transport.out[-1].startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"unexpected answers: {len(transport.out)}, {transport.out[-1][:40]!r}")
    return spent / requests


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20_000)
    args = p.parse_args()
    per = uvloop.run(measure(args.requests))
    print(f"{per * 1e6:.1f} us of CPU per request over {args.requests:,} requests")


if __name__ == "__main__":
    main()
