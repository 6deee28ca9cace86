"""The server's two paths for a request (``tally.api.server``): our application's plain requests
answered without ASGI messages, the others through uvicorn's own cycle; the same answers either
way, over a real uvicorn server in this process and raw sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tally.api.app import create_app
from tally.api.server import uvicorn_options
from tally.bootstrap import build
from tally.settings import Settings
from tests.helpers import uvicorn_serving

pytestmark = pytest.mark.anyio
WAIT_S = 10.0


@pytest.fixture
async def port(settings: Settings) -> AsyncIterator[int]:
    app = create_app(settings, build(settings))
    async with uvicorn_serving(app, uvicorn_options(settings)) as chosen:
        yield chosen


def like(user: int, extra: bytes = b"", version: bytes = b"HTTP/1.1", item: bytes = b"1") -> bytes:
    body = b'{"user_id":%d,"item_type":"post","item_id":%s}' % (user, item)
    return (b"POST /v1/like " + version + b"\r\nhost: t\r\ncontent-type: application/json\r\n"
            + extra + b"content-length: %d\r\n\r\n" % len(body) + body)


async def exchange(port: int, *sends: bytes, answers: int = 1) -> list[bytes]:
    """Sends each part in turn (a short pause between), then reads ``answers`` responses."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for part in sends:
            writer.write(part)
            await asyncio.sleep(0.05)
        out = []
        for _ in range(answers):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
            if head.startswith(b"HTTP/1.1 100"):
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            body = b"" if b"HEAD" in sends[0][:5] else await asyncio.wait_for(
                reader.readexactly(length), WAIT_S)
            out.append(head + body)
        return out
    finally:
        writer.close()


async def test_pipelined_requests_are_answered_in_order(port: int) -> None:
    first, second = await exchange(port, like(1) + like(2), answers=2)
    assert first.startswith(b"HTTP/1.1 200") and b'"user_id":"1"' in first
    assert second.startswith(b"HTTP/1.1 200") and b'"user_id":"2"' in second
    assert b'"count":2' in second


async def test_a_body_in_two_sends_and_a_body_after_100_continue(port: int) -> None:
    request = like(3)
    (split,) = await exchange(port, request[:-7], request[-7:])
    assert split.startswith(b"HTTP/1.1 200") and b'"changed":true' in split
    expecting = like(4, b"expect: 100-continue\r\n")
    cut = expecting.index(b"\r\n\r\n") + 4
    (continued,) = await exchange(port, expecting[:cut], expecting[cut:])
    assert continued.startswith(b"HTTP/1.1 200") and b'"user_id":"4"' in continued


async def test_errors_keep_their_status_body_and_headers(port: int) -> None:
    (wrong,) = await exchange(port, b"GET /v1/like HTTP/1.1\r\nhost: t\r\n\r\n")
    assert wrong.startswith(b"HTTP/1.1 405") and b"allow: POST\r\n" in wrong
    assert b'"code":"method_not_allowed"' in wrong
    (bad,) = await exchange(port, like(5, item=b"[]"))
    assert bad.startswith(b"HTTP/1.1 422") and b'"field":"item_id"' in bad


async def test_http_1_0_closes_and_head_is_answered(port: int) -> None:
    (old,) = await exchange(port, like(6, version=b"HTTP/1.0"))
    assert old.startswith(b"HTTP/1.1 200") and b"connection: close\r\n" in old
    (head,) = await exchange(port, b"HEAD /v1/items/post/1/counts HTTP/1.1\r\nhost: t\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405")  # GET only; answered, head without its body


async def test_a_forwarded_client_takes_uvicorns_path(port: int) -> None:
    """uvicorn's proxy-headers middleware trusts loopback's x-forwarded-for: the client is then
    the address forwarded, not loopback, and client routes refuse it without a key."""
    (forwarded,) = await exchange(port, like(7, b"x-forwarded-for: 203.0.113.9\r\n"))
    assert forwarded.startswith(b"HTTP/1.1 403")
