"""Crash: SIGKILL the server under concurrent write load, restart it, lose nothing acknowledged.

What this proves is durability against a *process* crash: a write is acknowledged only after its
transaction committed, and a committed SQLite WAL transaction is in the operating system's page
cache, which outlives the killed process. Durability against power loss comes from
``sqlite_synchronous=FULL`` (an fsync of the WAL before each commit returns); a SIGKILL cannot
prove that, since the OS never loses its cache here.

Each round kills the server at a different moment, counted in acknowledged writes (not time),
then restarts it on the same data directory, where the previous rounds' state must also hold.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import anyio
import httpx
import pytest

from tests.conftest import ServerFactory, ServerProcess
from tests.helpers import poll, recount

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

WORKERS, USERS_PER_WORKER, ITEMS, MAX_OPS = 12, 10, 8, 400
Pair = tuple[int, int]  # (user, item)


@dataclass
class Ledger:
    """What the clients were told: the last acknowledged state, and ops whose answer was lost."""

    acked: dict[Pair, bool] = field(default_factory=dict)
    in_doubt: dict[Pair, bool] = field(default_factory=dict)
    acks: int = 0


async def load(url: str, ledger: Ledger, seed: int) -> None:
    """Each worker owns its users, so the ops on one (user, item) pair are sequential."""
    async def worker(w: int) -> None:
        rng = random.Random(seed * 1000 + w)
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            for _ in range(MAX_OPS):
                pair = (w * USERS_PER_WORKER + rng.randrange(USERS_PER_WORKER), rng.randrange(ITEMS))
                on = rng.random() < 0.6
                ledger.in_doubt[pair] = on
                try:
                    r = await c.post("/v1/like" if on else "/v1/unlike",
                                     json={"user_id": pair[0], "item_type": "post",
                                           "item_id": pair[1]})
                except httpx.TransportError:
                    return  # the server died: this op's fate is unknown
                assert r.status_code == 200, r.text
                del ledger.in_doubt[pair]
                ledger.acked[pair] = on
                ledger.acks += 1

    async with anyio.create_task_group() as tg:
        for w in range(WORKERS):
            tg.start_soon(worker, w)


async def kill_after(server: ServerProcess, ledger: Ledger, acks: int) -> None:
    with anyio.fail_after(60):
        while ledger.acks < acks:
            await anyio.sleep(0.002)
    await anyio.to_thread.run_sync(server.kill)


async def check_recovered(server: ServerProcess, ledger: Ledger) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
        items = [{"item_type": "post", "item_id": i} for i in range(ITEMS)]
        for user in range(WORKERS * USERS_PER_WORKER):
            r = await c.post("/v1/has", json={"user_id": user, "items": items})
            for item, got in enumerate(x["on"] for x in r.json()["results"]):
                pair = (user, item)
                before = ledger.acked.get(pair, False)
                if pair in ledger.in_doubt:  # either outcome is correct; now it is known
                    assert got in (before, ledger.in_doubt.pop(pair)), pair
                else:
                    assert got is before, f"acknowledged state of {pair} lost"
                ledger.acked[pair] = got
        truth = recount(server.data_dir / "tally.db")
        expected = [truth.get(("like", f"post:{i}"), 0) for i in range(ITEMS)]
        assert expected == [sum(on for (_, i), on in ledger.acked.items() if i == item)
                            for item in range(ITEMS)]

        async def converged() -> bool:
            r = await c.post("/v1/counts", json={"items": items, "counters": ["like"]})
            return [x["counts"]["like"] for x in r.json()["results"]] == expected

        await poll(converged, timeout_s=30)


async def test_sigkill_under_load_loses_no_acknowledged_write(
        server_factory: ServerFactory) -> None:
    server = server_factory()
    server.start()
    ledger = Ledger()
    doubted = 0
    for round_, kill_at in enumerate((20, 120, 400)):
        start_acks = ledger.acks
        async with anyio.create_task_group() as tg:
            tg.start_soon(load, server.url, ledger, round_)
            tg.start_soon(kill_after, server, ledger, start_acks + kill_at)
        assert server.proc is not None and server.proc.returncode == -9
        doubted += len(ledger.in_doubt)
        server.start()
        await check_recovered(server, ledger)
    assert ledger.acks > 540
    assert doubted > 0  # the kills did land while requests were in flight
