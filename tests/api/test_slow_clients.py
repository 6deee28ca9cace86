"""Slow and hostile clients (issue 16): the header deadline, the body deadline, the cap on
connections per client address; against a real uvicorn server in this process, with the
deadlines shortened so each test is bounded."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from tally.api.app import TallyApp, create_app
from tally.api.server import GuardedHttpTools, uvicorn_options
from tally.bootstrap import build
from tally.settings import Settings
from tests.helpers import uvicorn_serving

pytestmark = pytest.mark.anyio
DEADLINE_S = 0.5


@asynccontextmanager
async def running(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[int]:
    monkeypatch.setattr(GuardedHttpTools, "per_client", GuardedHttpTools.per_client)  # restored
    app: TallyApp = create_app(settings, build(settings))
    app.body_timeout_s = DEADLINE_S
    opts = uvicorn_options(settings)
    monkeypatch.setattr(GuardedHttpTools, "header_timeout_s", DEADLINE_S)
    async with uvicorn_serving(app, opts) as port:
        yield port


async def answer(reader: asyncio.StreamReader) -> bytes:
    """Whatever the server sends before it closes (bounded by the test's own timeout)."""
    return await asyncio.wait_for(reader.read(), timeout=DEADLINE_S * 10)


async def test_a_slow_header_client_is_cut_off(settings: Settings,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    async with running(settings, monkeypatch) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/like HTTP/1.1\r\nhost: x\r\n")
        for _ in range(3):  # one header line now and then, never the blank line
            await asyncio.sleep(DEADLINE_S / 3)
            if reader.at_eof():
                break
            writer.write(b"x-slow: 1\r\n")
        got = await answer(reader)
        assert got.startswith(b"HTTP/1.1 408 ") and b'"code":"timeout"' in got
        writer.close()
        # A keep-alive connection's second request gets the same deadline.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET /healthz HTTP/1.1\r\n")
        got = await answer(reader)
        assert got.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 408 " in got
        writer.close()


async def test_a_slow_body_client_gets_408(settings: Settings,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    async with running(settings, monkeypatch) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/like HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 100\r\n\r\n{}")  # announces 100 bytes, sends 2
        got = await answer(reader)
        assert got.startswith(b"HTTP/1.1 408 ") and b'"code":"timeout"' in got
        writer.close()


async def test_connections_per_client_address_are_capped(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running(settings.replace(max_connections_per_client=3), monkeypatch) as port:
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        got = await answer(reader)
        assert got.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in got
        writer.close()
        for s in held:
            s.close()
        await asyncio.sleep(0.2)  # the server sees them go
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        assert (await answer(reader)).startswith(b"HTTP/1.1 200 ")
        writer.close()
