#!/usr/bin/env python3
"""CPU of the likes writer child per message and per like, by thread, without HTTP.

The server's own handle on the child (``WriterProcess``) starts a child on a fresh database in a
temporary directory, and this process keeps ``--in-flight`` messages of ``--likes`` new likes
each on their way to it (uniform items, a new user each: every like is a change) for
``--seconds``. The child's CPU comes from ``/proc/<pid>/task``, user and system apart per
thread; the driver's own CPU (framing, the sends and the answers) is shown beside it. What this
isolates is the child's fixed cost per message (a wake-up, a commit, a sync and the answer)
against its cost per like; ``tally serve`` under a load generator mixes both with the API
process's.

Run it from two source trees to compare a change with its base, alternating (repeat; compare
medians):

    PYTHONPATH=/tmp/base .venv/bin/python scripts/bench-writer-child.py --likes 1,16,64
    PYTHONPATH=$PWD      .venv/bin/python scripts/bench-writer-child.py --likes 1,16,64
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from pathlib import Path

from tally.core.model import ToggleOp
from tally.store.sqlite.writer_process import WriterConfig, WriterProcess

TICK = os.sysconf("SC_CLK_TCK")
ITEMS = 10_000_000
WARM_MESSAGES = 200


def thread_cpu(pid: int) -> dict[str, tuple[float, float]]:
    """(user, system) CPU seconds of each thread of ``pid`` so far."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                stat = fh.read()
        except FileNotFoundError:
            continue  # the thread ended meanwhile
        fields = stat[stat.rindex(")") + 2:].split()
        out[tid] = (int(fields[11]) / TICK, int(fields[12]) / TICK)
    return out


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


async def measure(likes: int, in_flight: int, seconds: float, first_user: int) -> str:
    with tempfile.TemporaryDirectory(prefix="tally-writer-child-") as work:
        writer = WriterProcess(WriterConfig(Path(work) / "tally.db"))
        await writer.start()
        assert writer.pid is not None
        users = iter(range(first_user, first_user + 10**9))

        def message() -> list[ToggleOp]:
            return [ToggleOp("like", f"post:{random.randrange(ITEMS)}", f"u{next(users)}",
                             True, "local") for _ in range(likes)]

        try:
            for _ in range(WARM_MESSAGES):
                await writer.write(message())
            sent = 0

            async def keep_sending(until: float) -> None:
                nonlocal sent
                while time.monotonic() < until:
                    await writer.write(message())
                    sent += 1

            before, driver_before, started = thread_cpu(writer.pid), own_cpu(), time.monotonic()
            await asyncio.gather(*[keep_sending(started + seconds) for _ in range(in_flight)])
            elapsed = time.monotonic() - started
            after, driver = thread_cpu(writer.pid), own_cpu() - driver_before
        finally:
            await writer.stop()
    per_thread = {tid: (u - before.get(tid, (0.0, 0.0))[0], s - before.get(tid, (0.0, 0.0))[1])
                  for tid, (u, s) in after.items()}
    child = sum(u + s for u, s in per_thread.values())
    threads = " ".join(f"t{i}: {u / sent * 1e6:.0f}u+{s / sent * 1e6:.0f}s"
                       for i, (u, s) in enumerate(per_thread.values()) if u + s > 0)
    return (f"{likes:>4} likes/msg {in_flight} in flight  {sent / elapsed:>6,.0f} msg/s "
            f"{sent * likes / elapsed:>7,.0f} likes/s  child {child / sent * 1e6:>6.0f} us/msg "
            f"{child / (sent * likes) * 1e6:>6.1f} us/like  driver {driver / sent * 1e6:>5.0f} "
            f"us/msg  by thread (us/msg) {threads}")


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--likes", default="1,16,64", help="comma list: likes per message")
    p.add_argument("--in-flight", type=int, default=2,
                   help="messages on their way at once (the server sends up to two)")
    p.add_argument("--seconds", type=float, default=4.0, help="measured seconds per size")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    first_user = 0
    for _ in range(args.rounds):
        for likes in (int(x) for x in args.likes.split(",")):
            first_user += 10**9
            print(await measure(likes, args.in_flight, args.seconds, first_user), flush=True)


if __name__ == "__main__":  # the child is spawned: it imports this file again as another name
    asyncio.run(main())
