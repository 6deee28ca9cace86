"""Deadlines against stalling clients, kept by one sleeper per process instead of a timer per
request: the body deadline (``HttpApp.read_body``).

Nearly every request meets its deadline. A timer each (``asyncio.timeout``) allocates a handle,
schedules it and cancels it again on every request, several times the cost of reading a body
that is already in. Here a request only writes its deadline into a dict and removes it; a
sleeper wakes every ``tick`` and acts on the deadlines that have passed, so one is kept at most
a quarter of its length late (a second at most). The header deadline stays a timer
(``tally.api.server``): it must be exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable


class Deadlines:
    """``set(key, seconds, on_expire)``: unless ``clear(key)`` comes first, ``on_expire()`` runs
    on the event loop once ``seconds`` have passed (up to a tick later)."""

    def __init__(self) -> None:
        self._due: dict[Hashable, tuple[float, Callable[[], None]]] = {}
        self._tick_s = 1.0
        self._sweeper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def set(self, key: Hashable, seconds: float, on_expire: Callable[[], None],
            loop: asyncio.AbstractEventLoop) -> None:
        self._due[key] = (loop.time() + seconds, on_expire)
        tick = min(max(seconds / 4, 0.01), 1.0)
        if tick < self._tick_s:
            self._tick_s = tick
        if self._sweeper is None or self._loop is not loop:
            self._loop = loop
            self._sweeper = loop.create_task(self._sweep(loop), name="tally-deadlines")

    def clear(self, key: Hashable) -> None:
        self._due.pop(key, None)

    async def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while self._due:
                await asyncio.sleep(self._tick_s)
                now = loop.time()
                late = [(key, act) for key, (when, act) in self._due.items() if when <= now]
                for key, act in late:
                    del self._due[key]
                    act()
        finally:
            if self._loop is loop:
                self._sweeper = None
