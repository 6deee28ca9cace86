"""Per-role CPU from /proc: a role's CPU includes descendants that started sessions of their own
(as PostgreSQL's backends do), alive or already reaped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tally_dev.bench.cpu import delta, role_of, tree_cpu_s

# The leader burns 0.3 s of CPU in a child that leaves its session (like a backend), reaps it,
# then burns 0.3 s in a grandchild that stays alive, and says so.
LEADER = """
import os, sys, time
def burn():
    start = time.process_time()
    while time.process_time() - start < 0.3:
        pass
pid = os.fork()
if pid == 0:
    os.setsid(); burn(); os._exit(0)
os.waitpid(pid, 0)
pid = os.fork()
if pid == 0:
    os.setsid(); burn(); print("ready", os.getpid(), flush=True); time.sleep(60); os._exit(0)
sys.stdout.write(sys.stdin.readline())
"""


def test_role_of() -> None:
    assert [role_of(n) for n in ("postgres-1", "api-0", "nats", "redis")] == \
        ["postgres", "api", "nats", "redis"]


def test_a_role_counts_its_whole_tree() -> None:
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as idle, \
            subprocess.Popen([sys.executable, "-c", LEADER], stdout=subprocess.PIPE,
                             stdin=subprocess.PIPE, text=True) as leader:
        pids = [idle.pid, leader.pid]
        try:
            before = tree_cpu_s({"idle-0": idle.pid})
            assert leader.stdout is not None
            word, grandchild = leader.stdout.readline().split()
            pids.insert(0, int(grandchild))
            assert word == "ready"
            cpu = tree_cpu_s({"busy-0": leader.pid, "idle-0": idle.pid})
            assert cpu["busy"] >= 0.55  # the reaped child's 0.3 s and the live grandchild's 0.3 s
            assert delta(before, cpu)["idle"] < 0.1
            assert tree_cpu_s({"gone-0": 2**22 + 7}) == {"gone": 0.0}  # no such process
        finally:
            for pid in pids:  # the grandchild first, while it is still the leader's
                os.kill(pid, signal.SIGKILL)
