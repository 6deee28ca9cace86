"""The HTTP server's guards against slow and hostile clients, as uvicorn's httptools protocol with
two additions: a deadline for a request's headers and a cap on connections per client address.

uvicorn itself bounds idle keep-alive connections (``timeout_keep_alive``) and all connections of
the process (``limit_concurrency``, 503 past it), but a client that sends one header line every
few seconds holds its connection for ever, and one address may open as many connections as the
server has. The body has its own deadline in the app (``HttpApp._body``), which can answer 408 in
JSON because the request is routed by then.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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
        self.cycle.transport = HeadWithBody(self.transport)  # type: ignore[assignment]

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


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """What ``tally serve`` passes to uvicorn for these guards."""
    GuardedHttpTools.configure(settings)
    return {"http": GuardedHttpTools, "timeout_keep_alive": KEEPALIVE_S,
            "limit_concurrency": settings.max_connections}
