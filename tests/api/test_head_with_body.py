"""A response's head goes out with its body in one write (one system call), as the server's
protocol hands it to uvicorn's response cycle; interim answers and closes are not held back."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from tally.api.server import HeadWithBody


class Recorded:
    """A transport that keeps what was written, in order, and whether it was closed."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else None


def _wrap(t: Recorded) -> HeadWithBody:
    return HeadWithBody(cast(asyncio.Transport, t))


def test_head_and_body_are_one_write_then_further_chunks_pass() -> None:
    t = Recorded()
    w = _wrap(t)
    w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n")
    assert t.writes == []
    w.write(b"ab")
    w.write(b"cd")
    assert t.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab", b"cd"]


def test_continue_goes_out_at_once_and_a_close_flushes_a_held_head() -> None:
    t = Recorded()
    w = _wrap(t)
    w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert t.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    w.write(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
    w.close()
    assert t.writes[1:] == [b"HTTP/1.1 500 Internal Server Error\r\n\r\n"] and t.closed
    assert w.get_extra_info("peername") == ("127.0.0.1", 1)  # the rest is the transport's
