"""The API's event loop accepts every waiting connection in a turn (``tally.api.listener``), where
uvloop's own server accepts one a turn: on a busy server new connections waited seconds."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable

import pytest
import uvloop

from tally.api.listener import RETRY_AFTER_S, GreedyAcceptLoop, GreedyServer

WAITING = 50  # connections queued while the loop is not running
TURNS = 8  # loop turns then allowed for them to be set up


class Echo(asyncio.Protocol):
    def __init__(self, made: list[asyncio.BaseTransport]) -> None:
        self.made = made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.made.append(transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


def set_up_within_turns(new_loop: Callable[[], asyncio.AbstractEventLoop]) -> int:
    """Queues WAITING connections (the kernel completes each handshake into the listening
    socket's queue), lets the loop run TURNS turns, and returns how many were set up by then;
    then checks that every connection is served and that ``close`` stops listening."""
    loop = new_loop()
    made: list[asyncio.BaseTransport] = []
    clients: list[socket.socket] = []
    try:
        server = loop.run_until_complete(
            loop.create_server(lambda: Echo(made), "127.0.0.1", 0, backlog=256))
        port = server.sockets[0].getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5)
                   for _ in range(WAITING)]

        async def turns() -> None:
            for _ in range(TURNS):
                await asyncio.sleep(0)

        loop.run_until_complete(turns())
        within = len(made)

        async def echoes() -> list[bytes]:
            for client in clients:
                client.setblocking(False)
                await loop.sock_sendall(client, b"ping")
            return [await asyncio.wait_for(loop.sock_recv(client, 4), 10) for client in clients]

        assert loop.run_until_complete(echoes()) == [b"ping"] * WAITING
        server.close()
        loop.run_until_complete(server.wait_closed())
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        ping = clients[0]  # a connection accepted before the close is still served
        loop.run_until_complete(loop.sock_sendall(ping, b"more"))
        assert loop.run_until_complete(asyncio.wait_for(loop.sock_recv(ping, 4), 10)) == b"more"
        return within
    finally:
        for client in clients:
            client.close()
        for transport in made:
            transport.close()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()


def test_every_waiting_connection_is_set_up_in_a_few_turns() -> None:
    assert set_up_within_turns(GreedyAcceptLoop) == WAITING


def test_uvloops_own_server_takes_one_connection_a_turn() -> None:
    """Why the loop above exists: uvloop's server (libuv >= 1.45) sets up about one waiting
    connection a turn (10 of 50 in 8 turns here), so a busy server, whose turns are long, keeps
    new clients waiting."""
    assert set_up_within_turns(uvloop.Loop) <= 2 * TURNS


def test_a_failing_accept_pauses_the_listener_instead_of_spinning() -> None:
    """Out of file descriptors, accept fails while the socket stays readable: the reader steps
    aside for RETRY_AFTER_S (a level-triggered reader called again at once would spin the loop),
    then accepts what queued meanwhile."""
    loop = GreedyAcceptLoop()
    made: list[asyncio.BaseTransport] = []
    try:
        server = loop.run_until_complete(
            loop.create_server(lambda: Echo(made), "127.0.0.1", 0))
        assert isinstance(server, GreedyServer)
        listening = server.sockets[0]

        class OutOfDescriptorsOnce:
            failed = False

            def fileno(self) -> int:
                return listening.fileno()

            def accept(self) -> tuple[socket.socket, object]:
                if not self.failed:
                    self.failed = True
                    raise OSError(errno.EMFILE, "Too many open files")
                return listening.accept()

        server._accept(OutOfDescriptorsOnce())  # type: ignore[arg-type]
        client = socket.create_connection(listening.getsockname(), timeout=5)
        loop.run_until_complete(asyncio.sleep(RETRY_AFTER_S / 4))
        assert made == []  # not read while paused
        loop.run_until_complete(asyncio.sleep(RETRY_AFTER_S * 3))
        assert len(made) == 1  # read again, the waiting connection accepted
        client.close()
        server.close()
    finally:
        for transport in made:
            transport.close()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
