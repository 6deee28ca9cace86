"""The HTTP server: uvicorn's httptools protocol with two guards and a shorter path for our
own application's requests.

The guards: a deadline for a request's headers and a cap on connections per client address.
uvicorn itself bounds idle keep-alive connections (``timeout_keep_alive``) and all connections of
the process (``limit_concurrency``, 503 past it), but a client that sends one header line every
few seconds holds its connection for ever, and one address may open as many connections as the
server has. The body has its own deadline in the app (``HttpApp.read_body``), which can answer
408 in JSON because the request is routed by then.

The shorter path: uvicorn hands each request to the application as ASGI messages (a scope, a
``receive`` and two ``send`` calls of dicts, each checked and turned into bytes) through its
proxy-headers middleware. For a request of ours that none of that serves (``_plain``), the
protocol calls the application's ``answer`` with the body it already holds and writes the head
and body in one send. uvicorn still parses, times out idle connections, queues pipelined requests,
refuses past ``limit_concurrency`` and shuts down; the application and its errors are the same.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from tally.api.http import HttpApp
from tally.api.listener import LOOP
from tally.settings import Settings

log = logging.getLogger("tally.server")

# Constants, not settings: they bound hostile clients, not a workload. An honest client sends its
# headers and a body of at most max_body_bytes within a few round trips; ten seconds covers a
# congested mobile link many times over.
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 10.0
KEEPALIVE_S = 5.0  # uvicorn's own default: an idle connection is cheap, but not free


def _raw(status: bytes, code: str, message: str) -> bytes:
    body = f'{{"error":{{"code":"{code}","message":"{message}"}}}}'.encode()
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


HEADER_TIMEOUT = _raw(b"408 Request Timeout", "timeout", "request headers not received in time")
TOO_MANY = _raw(b"503 Service Unavailable", "too_many_connections",
                "too many connections from this address")


class HeadWithBody:
    """The transport as one response's cycle sees it: the head is held until the body's first
    write and goes out with it, in one send. uvicorn writes the two apart, and each write on a
    socket is a system call that, on loopback, also runs the receiver's side of TCP: the two
    sends were the largest share of the API process's time under likes. An interim answer
    (``100 Continue``) goes out at once, and a close sends a head still held."""

    __slots__ = ("_head", "_sent", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._head: bytes | None = None
        self._sent = False

    def write(self, data: bytes) -> None:
        if self._sent:
            self._transport.write(data)
        elif self._head is not None:
            self._sent = True
            self._transport.write(self._head + data)
            self._head = None
        elif data.startswith(b"HTTP/1.1 1"):
            self._transport.write(data)
        else:
            self._head = data

    def close(self) -> None:
        if self._head is not None:
            self._transport.write(self._head)
            self._head = None
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedHttpTools(HttpToolsProtocol):
    """One per connection. The limits are class attributes set once per process by ``configure``
    (each uvicorn worker process builds its app, and calls it, from the same settings)."""

    header_timeout_s: ClassVar[float] = HEADER_TIMEOUT_S
    per_client: ClassVar[int] = 256
    open_by_client: ClassVar[dict[str, int]] = {}

    _header_timer: asyncio.TimerHandle | None = None
    _headers_since: float | None = None  # a keep-alive request began, its headers not yet in
    _client_host: str | None = None

    @classmethod
    def configure(cls, settings: Settings) -> None:
        cls.per_client = settings.max_connections_per_client

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        host = self.client[0] if self.client else ""
        count = self.open_by_client.get(host, 0) + 1
        self.open_by_client[host] = count
        self._client_host = host
        if count > self.per_client:
            log.warning("refused a connection from %s: it holds %d already", host, count - 1)
            transport.write(TOO_MANY)
            transport.close()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        host = self._client_host
        if host is not None:
            self._client_host = None
            left = self.open_by_client.get(host, 1) - 1
            if left > 0:
                self.open_by_client[host] = left
            else:
                self.open_by_client.pop(host, None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """A keep-alive request's header timer is armed only if its headers did not all come
        in this read: an honest client's do, so it costs no timer (creating and cancelling one
        per request was a measurable share of a small request's time)."""
        super().data_received(data)
        since = self._headers_since
        if (since is not None and self._header_timer is None and self.header_timeout_s > 0
                and not self.transport.is_closing()):
            self._header_timer = self.loop.call_at(since + self.header_timeout_s,
                                                   self._too_slow)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:  # a keep-alive connection's next request
            self._headers_since = self.loop.time()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        """Our application's requests skip the ASGI messages (``_answer``) when nothing about
        them needs uvicorn's own handling; every other request, and every other application
        (uvicorn's 503 past ``limit_concurrency``), takes uvicorn's path."""
        target = _direct_target(app) if app is self.app else None
        if target is None or not _plain(cycle):
            if cycle.scope["method"] != "HEAD":  # uvicorn writes no body after a HEAD's head
                cycle.transport = HeadWithBody(self.transport)  # type: ignore[assignment]
            super()._start_asgi_task(cycle, app)
            return
        task = self.loop.create_task(self._answer(target, cycle))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    async def _answer(self, app: HttpApp, cycle: RequestResponseCycle) -> None:
        """One request answered by the application without ASGI's message dicts, and its
        answer written in one send: what ``RequestResponseCycle.run_asgi``, ``receive`` and
        ``send`` do for such a request, as uvicorn does it (same head, same keep-alive and
        close, same 500 on an error the application did not answer)."""
        try:
            start = time.perf_counter()
            scope: Any = cycle.scope
            receive: Any = cycle.receive
            if cycle.more_body:  # not all in yet: read it as uvicorn's receive would
                answer = await app.answer(scope, lambda: app.read_body(scope, receive))
            else:
                body = bytes(cycle.body)
                answer = await app.answer(scope, lambda: app.whole_body(scope, body))
            if answer.stream is not None:  # a stream: uvicorn's send, chunk by chunk
                cycle.transport = HeadWithBody(self.transport)  # type: ignore[assignment]
                headers = [(b"content-type", answer.media), *answer.extra]
                await cycle.send({"type": "http.response.start", "status": answer.status,
                                  "headers": headers})
                async for chunk in answer.stream:
                    await cycle.send({"type": "http.response.body", "body": chunk,
                                      "more_body": True})
                await cycle.send({"type": "http.response.body", "body": b""})
            else:
                await self._write(cycle, answer.status, answer.media, answer.extra,
                                  answer.payload)
            app.observe(answer, scope["method"], start)
        except BaseException as exc:
            self.logger.error("Exception in ASGI application\n", exc_info=exc)
            if not cycle.response_started:
                await cycle.send_500_response()
            else:
                self.transport.close()
        finally:
            cycle.on_response = lambda: None

    async def _write(self, cycle: RequestResponseCycle, status: int, media: bytes,
                     extra: tuple[tuple[bytes, bytes], ...], payload: bytes) -> None:
        """The head and body of a whole answer in one write, then the cycle completed as
        uvicorn's ``send`` completes it. The headers are the application's own (no check for
        injected line breaks needed), after uvicorn's defaults (date, server)."""
        if cycle.flow.write_paused and not cycle.disconnected:
            await cycle.flow.drain()
        if cycle.disconnected:
            return
        cycle.response_started = True
        parts = [STATUS_LINE[status], _defaults(cycle.default_headers),
                 b"content-type: ", media, b"\r\n"]
        for name, value in extra:
            parts += (name, b": ", value, b"\r\n")
        parts += (b"content-length: ", str(len(payload)).encode(), b"\r\n")
        if not cycle.keep_alive:
            parts.append(b"connection: close\r\n")
        parts += (b"\r\n", payload)
        self.transport.write(b"".join(parts))
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            self.transport.close()
        cycle.on_response()

    def _arm(self) -> None:
        """A timer, exact to the deadline (``Deadlines`` would act up to a tick late, while a
        slow client may still be sending: its next line would then meet a closed socket and
        reset the connection before it reads the 408)."""
        if self.header_timeout_s > 0:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        self._headers_since = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        self._headers_since = None
        if not self.transport.is_closing():
            self.transport.write(HEADER_TIMEOUT)
            self.transport.close()


def _direct_target(app: Any) -> HttpApp | None:
    """Our application under uvicorn's proxy-headers middleware (which only rewrites the
    client of a request with ``x-forwarded-*`` headers: those take uvicorn's path)."""
    while not isinstance(app, HttpApp):
        if type(app).__name__ != "ProxyHeadersMiddleware":
            return None
        app = app.app
    return app


def _plain(cycle: RequestResponseCycle) -> bool:
    """A request uvicorn's own path adds nothing to: no ``100 Continue`` owed, no access log
    line, not HEAD (no body in the answer), no forwarded client to rewrite."""
    if cycle.waiting_for_100_continue or cycle.access_log or cycle.scope["method"] == "HEAD":
        return False
    return not any(name.startswith(b"x-forwarded-") for name, _value in cycle.scope["headers"])


_default_head: tuple[list[tuple[bytes, bytes]] | None, bytes] = (None, b"")


def _defaults(headers: list[tuple[bytes, bytes]]) -> bytes:
    """uvicorn's default headers as head lines; uvicorn makes a new list when the date
    changes (once a second), so the lines are joined once per list."""
    global _default_head
    if _default_head[0] is not headers:
        _default_head = (headers, b"".join(n + b": " + v + b"\r\n" for n, v in headers))
    return _default_head[1]


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """What ``tally serve`` passes to uvicorn for these guards."""
    GuardedHttpTools.configure(settings)
    return {"http": GuardedHttpTools, "loop": LOOP, "timeout_keep_alive": KEEPALIVE_S,
            "limit_concurrency": settings.max_connections}
