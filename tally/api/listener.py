"""The event loop the API serves on: uvloop, accepting every waiting connection at once.

libuv, under uvloop, accepts one connection per turn of the event loop (since libuv 1.45,
libuv/libuv#3696: it relies on the listening socket staying readable to be called again). A busy
server's turn lasts as long as the requests it answers in it, tens of milliseconds under load, so
a burst of new connections (a client's pool opening, clients reconnecting after a load balancer
restarts) waited that long per connection, seconds for the last of a burst, while the
connections already open were answered as usual (docs/performance.md, "New connections under
load"). Here the
listening socket is read by a reader of our own that accepts every waiting connection, up to
``ACCEPT_BATCH`` a turn, and hands each to uvloop as an accepted socket: its transport is then
uvloop's own, as it would be had libuv accepted it.

uvicorn asks for this loop by its import string (``LOOP``); ``create_server`` lets uvloop bind
and listen as usual, then takes the listening sockets over from it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import uvloop

log = logging.getLogger("tally.listener")

LOOP = "tally.api.listener:GreedyAcceptLoop"  # uvicorn's ``loop`` setting: an import string
# Connections accepted in one turn at most: a flood of connections still leaves the turn to the
# requests of those already open, and where worker processes share one listening socket (uvicorn's
# ``workers``), the first awake does not take a whole burst from the others.
ACCEPT_BATCH = 32
# After an accept failed (out of file descriptors or memory, most likely), the socket is left
# alone this long: it stays readable, and trying again at once would spin the loop.
RETRY_AFTER_S = 0.1


class GreedyAcceptLoop(uvloop.Loop):
    async def create_server(  # type: ignore[override]  # one signature for asyncio's overloads
            self, protocol_factory: Callable[[], asyncio.BaseProtocol], *args: Any,
            **kwargs: Any) -> asyncio.AbstractServer:
        """uvloop's server, with its listening sockets accepted from by ``GreedyServer``
        (a TLS server is left as uvloop makes it: its handshakes are uvloop's)."""
        server = await super().create_server(protocol_factory, *args, **kwargs)
        if kwargs.get("ssl") is not None:
            return server
        return GreedyServer(self, protocol_factory, server)


class GreedyServer(asyncio.AbstractServer):
    """The listening sockets of a uvloop server, taken over: each is a duplicate of uvloop's
    descriptor (the same socket, so nothing is unbound or dropped from its queue), uvloop's
    server is closed, and a reader accepts from the duplicate."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 protocol_factory: Callable[[], asyncio.BaseProtocol],
                 server: Any) -> None:  # uvloop's Server
        self._loop = loop
        self._factory = protocol_factory
        self._listening: list[socket.socket] = []
        for held in server.sockets:
            listening = socket.socket(held.family, held.type, fileno=os.dup(held.fileno()))
            listening.setblocking(False)
            self._listening.append(listening)
        server.close()
        self._serving = True
        self._closed: asyncio.Future[None] = loop.create_future()
        for listening in self._listening:
            loop.add_reader(listening.fileno(), self._accept, listening)

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _address = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # the client gave up while queued: take the next one
                if self._serving:  # out of descriptors or memory, or worse: never spin on it
                    log.warning("cannot accept connections for now (%s); trying again in "
                                "%.1f s", exc, RETRY_AFTER_S)
                    self._loop.remove_reader(listening.fileno())
                    self._loop.call_later(RETRY_AFTER_S, self._resume, listening)
                return
            conn.setblocking(False)
            task = self._loop.create_task(
                self._loop.connect_accepted_socket(self._factory, conn))
            task.add_done_callback(_log_failure)

    def _resume(self, listening: socket.socket) -> None:
        if self._serving:
            self._loop.add_reader(listening.fileno(), self._accept, listening)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._listening)

    def close(self) -> None:
        """Stops listening; connections already accepted go on (as ``asyncio.Server.close``)."""
        if not self._serving:
            return
        self._serving = False
        for listening in self._listening:
            self._loop.remove_reader(listening.fileno())
            listening.close()
        self._closed.set_result(None)

    def is_serving(self) -> bool:
        return self._serving

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    async def start_serving(self) -> None:
        """Serving from the start."""

    async def serve_forever(self) -> None:
        await asyncio.shield(self._closed)

    async def wait_closed(self) -> None:
        """Until ``close``, which stops listening at once."""
        await asyncio.shield(self._closed)


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("an accepted connection could not be set up: %r", exc)
