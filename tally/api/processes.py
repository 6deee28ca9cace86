"""``tally serve --workers N`` on embedded SQLite: N API processes on one port, one likes writer.

The first process is the one ``tally serve`` started: it runs today's whole embedded runtime
(the likes writer child, the aggregation, the checkpoints), its writer also listening on a Unix
socket in a directory private to this user. Once its runtime is up it starts the N-1 others,
each building ``bootstrap.build_api_process``: it writes through the writer's socket and reads
the SQLite files directly (WAL readers never wait for the writer). Every process binds the port
with SO_REUSEPORT, so the kernel spreads new connections over their accept queues, whichever
process is busy (with one inherited socket the idlest process would take most of them).

The first process watches the others: one that dies is started again after a pause; on shutdown
each is asked to stop (SIGTERM: uvicorn finishes the requests in flight) before the writer stops.
Each process has its own metrics (a scrape sees one of them), rate-limit buckets and per-client
connection counts: limits per key or per client are per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any

from tally.metrics import Metrics, Sample
from tally.settings import Settings

log = logging.getLogger("tally.processes")

RESTART_DELAY_S = 1.0
STOP_TIMEOUT_S = 15.0  # uvicorn's graceful shutdown is 10 s
PR_SET_PDEATHSIG = 1  # prctl(2)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket of one API process: SO_REUSEPORT, so every process binds its own."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def uvicorn_config(app: Any, settings: Settings) -> Any:
    import uvicorn

    from tally.api.server import uvicorn_options

    return uvicorn.Config(app, log_config=None, access_log=settings.access_log,
                          timeout_graceful_shutdown=10, **uvicorn_options(settings))


def api_process_main(settings: Settings, port: int, writers_dir: Path) -> None:
    """One of the other API processes (spawned): its own socket on the port, its own runtime."""
    import uvicorn

    from tally import logs
    from tally.api.app import create_app
    from tally.bootstrap import build_api_process

    _die_with_parent()
    logs.setup(settings.log_level)
    sock = bind(settings.host, port)
    app = create_app(settings, build_api_process(settings, writers_dir), owns_process=True)
    uvicorn.Server(uvicorn_config(app, settings)).run(sockets=[sock])


def _die_with_parent() -> None:
    """SIGTERM when the first process dies, however it dies: without its likes writer this one
    could only answer 503 to every write."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        log.warning("cannot ask to stop with the first API process",
                    extra={"errno": ctypes.get_errno()})
    if os.getppid() == 1:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


class ApiProcesses:
    """The first process's handle on the others: starts them, restarts the dead, stops them."""

    def __init__(self, settings: Settings, port: int, writers_dir: Path, metrics: Metrics) -> None:
        self.settings = settings
        self.port = port
        self.writers_dir = writers_dir
        self.restarts = 0
        self._procs: list[Any] = []
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False
        metrics.add_state(self.state)

    def _spawn(self) -> Any:
        """On the event loop's thread, which lives as long as the process: the child's death
        signal (``_die_with_parent``) follows the thread that started it."""
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(target=api_process_main, name="tally-api",
                           args=(self.settings, self.port, self.writers_dir))
        proc.start()
        return proc

    async def start(self) -> None:
        self._stopping = False
        for _ in range(self.settings.workers - 1):
            self._procs.append(self._spawn())
        log.info("API processes started", extra={
            "processes": self.settings.workers, "pids": [p.pid for p in self._procs]})
        self._watch = asyncio.create_task(self._watch_loop(), name="tally-api-processes")

    async def _watch_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(RESTART_DELAY_S)
            for i, proc in enumerate(self._procs):
                if proc.is_alive() or self._stopping:
                    continue
                log.error("API process exited; starting another",
                          extra={"pid": proc.pid, "exitcode": proc.exitcode})
                self._procs[i] = self._spawn()
                self.restarts += 1

    async def stop(self) -> None:
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: uvicorn's graceful shutdown
        for proc in self._procs:
            await asyncio.to_thread(proc.join, STOP_TIMEOUT_S)
            if proc.is_alive():
                log.warning("API process did not stop in time; killed", extra={"pid": proc.pid})
                proc.kill()
                await asyncio.to_thread(proc.join, 5)
        self._procs.clear()
        # The writers' sockets: no other process connects any more. Here rather than after the
        # server returns, since uvicorn re-raises the SIGTERM it stopped for once it returns.
        shutil.rmtree(self.writers_dir, ignore_errors=True)

    def state(self) -> list[Sample]:
        return [("gauge", "tally_api_processes", "API processes serving the port, this one "
                 "included", float(1 + sum(p.is_alive() for p in self._procs)), {}),
                ("counter", "tally_api_process_restarts",
                 "Times another API process died and was started again", float(self.restarts),
                 {})]


def serve(settings: Settings) -> None:
    """``tally serve`` with ``workers`` > 1 on SQLite: this process first, the others from it."""
    import uvicorn

    from tally.api.app import create_app
    from tally.bootstrap import build

    writers_dir = Path(tempfile.mkdtemp(prefix="tally-writers-"))  # mode 0700
    try:
        sock = bind(settings.host, settings.port)
        port = sock.getsockname()[1]
        runtime = build(settings, writers_dir)
        app = create_app(settings, runtime, owns_process=True)
        app.others = ApiProcesses(settings, port, writers_dir, runtime.metrics)
        uvicorn.Server(uvicorn_config(app, settings)).run(sockets=[sock])
    finally:  # when it did not start; after a signal, ApiProcesses.stop removed it
        shutil.rmtree(writers_dir, ignore_errors=True)
