"""Lease tests' referee: who runs each key, failing the test if two live members ever run the
same one (a crashed member may run on until it notices: overlap with it is the fence's job)."""

from __future__ import annotations

from tally.store.ports import Leases
from tally.workers.leases import LeaseSet

KEYS = [f"p{n}" for n in range(8)]


class Owners:
    def __init__(self) -> None:
        self.owner: dict[str, str] = {}
        self.crashed: set[str] = set()

    def member(self, leases: Leases, name: str, period_s: float) -> LeaseSet:
        async def gain(key: str) -> None:
            runner = self.owner.get(key)
            assert runner is None or runner in self.crashed, f"{key}: {name} gained, {runner} runs"
            self.owner[key] = name

        async def lose(key: str) -> None:
            if self.owner.get(key) == name:
                del self.owner[key]
            else:
                assert name in self.crashed

        return LeaseSet(leases, "test", KEYS, gain, lose, period_s=period_s)

    def held(self, name: str) -> int:
        return sum(1 for v in self.owner.values() if v == name)

    def shares(self, names: tuple[str, ...]) -> list[int]:
        return sorted(self.held(n) for n in names)
