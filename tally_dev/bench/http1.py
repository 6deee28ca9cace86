"""A minimal HTTP/1.1 keep-alive client connection, one request in flight at a time.

httpx costs more CPU per request than a small server spends answering it; a load generator built
on it measures itself. This protocol writes prebuilt request bytes and parses only what it needs:
the status code and where the response ends (Content-Length, or a chunked body's last chunk).
"""

from __future__ import annotations

import asyncio
from typing import cast

_HEAD_END = b"\r\n\r\n"


class ConnectionLost(Exception):
    """The server closed the connection (or it broke) while a request was in flight."""


class Http1Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[int] | None = None
        self.closed = False

    @classmethod
    async def open(cls, host: str, port: int) -> Http1Connection:
        loop = asyncio.get_running_loop()
        _transport, proto = await loop.create_connection(cls, host, port)
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionLost(str(exc or "closed by the server")))

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._waiter is None or self._waiter.done():
            return
        status = self._complete()
        if status is not None:
            self._waiter.set_result(status)

    def _complete(self) -> int | None:
        """The status once a whole response is buffered (and consumed), else None."""
        end = self._buf.find(_HEAD_END)
        if end < 0:
            return None
        head = bytes(self._buf[:end]).lower()
        status = int(head[9:12])
        if b"\r\nconnection: close" in head:
            self.closed = True  # the server closes after this response: reconnect before the next
        body_start = end + 4
        pos = head.find(b"\r\ncontent-length:")
        if pos >= 0:
            stop = head.find(b"\r\n", pos + 2)
            length = int(head[pos + 17:stop if stop >= 0 else len(head)])
            if len(self._buf) < body_start + length:
                return None
            del self._buf[:body_start + length]
            return status
        if b"transfer-encoding: chunked" in head:
            last = self._buf.find(b"\r\n0\r\n\r\n", body_start - 2)
            if last < 0:
                return None
            del self._buf[:last + 7]
            return status
        del self._buf[:body_start]  # no body (204, 304)
        return status

    async def request(self, data: bytes) -> int:
        """Sends one request and returns the response's status code."""
        if self.closed or self.transport is None:
            raise ConnectionLost("connection is closed")
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self._waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
