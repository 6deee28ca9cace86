"""``python -m tally_dev.bench.nullserver PORT``: answers every request with a fixed small response.

It does almost nothing per request, so driving it in closed loop measures the load generator's
own ceiling: if that is well above what a real server answers, the generator is not the
bottleneck of the runs.
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

import uvloop

_RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n"
             b'{"status":"ok"}')


class _Null(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.buf[:end]).lower()
            pos = head.find(b"content-length:")
            stop = head.find(b"\r\n", pos)
            length = int(head[pos + 15:stop if stop >= 0 else len(head)]) if pos >= 0 else 0
            if len(self.buf) < end + 4 + length:
                return
            del self.buf[:end + 4 + length]
            assert self.transport is not None
            self.transport.write(_RESPONSE)


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Null, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> int:
    uvloop.run(serve(int(sys.argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
