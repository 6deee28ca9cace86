"""CPU seconds used by each role of a development cluster (its processes' trees), from /proc.

Why: the capacity calculator (``tally capacity``) needs what one core of each role (API, relay,
aggregator, PostgreSQL, NATS, Redis) serves. On a shared two-core machine the throughput of the
whole cluster says nothing about how it splits between the roles; the CPU each role spent per
operation does. Every engine and Tally process of ``tally_dev.cluster`` runs in a process group of
its own (``start_new_session``), but PostgreSQL's backends start sessions of their own, so a role's
CPU is summed over the process tree under each process the cluster started: the live members'
own times and their reaped children's (backends that ended are in the postmaster's).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def role_of(name: str) -> str:
    """``postgres-1`` -> ``postgres``, ``api-0`` -> ``api``, ``nats`` -> ``nats``."""
    return name.rsplit("-", 1)[0] if name.rsplit("-", 1)[-1].isdigit() else name


def tree_cpu_s(roots: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds (user + system, with reaped children) per role, summed over each named
    process and all its descendants; a process that has ended counts 0."""
    ticks: dict[int, int] = {}
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # the name may hold spaces and parentheses
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        ticks[pid] = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    out: dict[str, float] = {}
    for name, root in roots.items():
        total, todo = 0, [root]
        while todo:
            pid = todo.pop()
            total += ticks.get(pid, 0)
            todo.extend(children.get(pid, ()))
        out[role_of(name)] = out.get(role_of(name), 0.0) + total / _TICK
    return out


def delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    return {role: round(after[role] - before.get(role, 0.0), 3) for role in after}


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (all its threads'), e.g. the SQLite writer of ``tally
    serve``; [] once the process is gone."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(c) for c in fh.read().split()]
        except OSError:
            continue
    return out


def listening(port: int) -> list[int]:
    """The processes holding a socket that listens on TCP ``port`` (IPv4 or IPv6)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    found: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry.name}/fd")
            if any(os.readlink(f"/proc/{entry.name}/fd/{fd}") in inodes for fd in fds):
                found.append(int(entry.name))
        except OSError:  # ended meanwhile, or not ours to read
            continue
    return found
