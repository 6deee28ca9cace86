"""The failover agent's rules against a model of etcd's semantics (leases that expire a TTL
after their last renewal, a revision-checked swap, no answer without the quorum), on one fake
clock: exactly one failover, a cut-off region fenced before its lease can expire, a map adopted
before deciding again, sources fenced once. ``tests/regions/test_failover_e2e.py`` runs the
same agent against a real etcd quorum in network namespaces."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from tally.core.errors import Unavailable
from tally.core.model import Event
from tally.core.regions import Placement
from tally.store.ports import Conflict, RecordState, ToggleKey, Witness
from tally.workers.failover import SAFE_SHARE, FailoverAgent

TTL = 10.0


@dataclass
class Quorum:
    """What the etcd cluster holds; ``cut`` regions cannot reach its majority."""

    now: float = 0.0
    leases: dict[str, tuple[str, float]] = field(default_factory=dict)  # id -> region, expiry
    members: set[str] = field(default_factory=set)
    placement: Placement | None = None
    revision: int = 0
    cut: set[str] = field(default_factory=set)
    next_id: int = 0

    def elect(self) -> None:
        """A leader elected after the quorum was lost extends every lease by a TTL (etcd's
        lessor Promote): none expired while nobody could renew."""
        self.leases = {k: (r, self.now + TTL) for k, (r, _exp) in self.leases.items()}

    def expire(self) -> None:
        self.leases = {k: v for k, v in self.leases.items() if v[1] > self.now}


class ModelWitness:
    def __init__(self, q: Quorum, region: str) -> None:
        self.q = q
        self.region = region
        self.lease: str | None = None

    def _reach(self) -> Quorum:
        if self.region in self.q.cut:
            raise Unavailable("no quorum")
        self.q.expire()
        return self.q

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def keepalive(self) -> float:
        q = self._reach()
        if self.lease not in q.leases:
            q.next_id += 1
            self.lease = str(q.next_id)
            q.members.add(self.region)
        q.leases[self.lease] = (self.region, q.now + TTL)
        return TTL

    async def alive(self) -> set[str]:
        return {r for r, _exp in self._reach().leases.values()}

    async def members(self) -> set[str]:
        return set(self._reach().members)

    async def placement(self) -> tuple[Placement | None, int]:
        q = self._reach()
        return q.placement, q.revision

    async def swap_placement(self, placement: Placement, revision: int) -> bool:
        q = self._reach()
        if q.revision != revision:
            return False
        q.placement, q.revision = placement, q.revision + 1
        return True


class MemRegions:
    """The placement part of a region's ``RegionStore``."""

    def __init__(self) -> None:
        self.stored: dict[int, Placement] = {}

    async def placement(self) -> Placement | None:
        return self.stored[max(self.stored)] if self.stored else None

    async def put_placement(self, placement: Placement) -> bool:
        return self.stored.setdefault(placement.epoch, placement) is placement

    async def apply_remote(self, events: Sequence[Event]) -> int:
        return 0

    async def records(self, keys: Collection[ToggleKey]) -> dict[ToggleKey, RecordState]:
        return {}

    async def force(self, states: Sequence[tuple[ToggleKey, bool, float]]) -> None: ...

    async def record_noops(self, states: Sequence[tuple[ToggleKey, bool, float]]) -> None: ...

    async def add_conflicts(self, conflicts: Sequence[Conflict]) -> None: ...

    async def conflicts(self) -> list[Conflict]:
        return []


class Region:
    def __init__(self, q: Quorum, name: str, names: Sequence[str]) -> None:
        self.routed: list[Placement] = []  # what the router was handed, in order
        self.sourced = [n for n in names if n != name]
        self.store = MemRegions()
        self.taken: list[tuple[str, int]] = []
        self.agent = FailoverAgent(name, ModelWitness(q, name), self.store,
                                   Placement.initial(names), self.routed.append,
                                   self.take_over, clock=lambda: q.now)

    async def take_over(self, failed: str, placement: Placement) -> None:
        """What ``regions_admin.complete_failover`` does to the parts modelled here."""
        assert self.routed[-1].epoch < placement.epoch  # before the router decides by it
        self.sourced = [p for p in self.sourced if p != failed]
        self.taken.append((failed, placement.epoch))
        await self.store.put_placement(placement)


def regions(names: Sequence[str]) -> tuple[Quorum, dict[str, Region]]:
    q = Quorum()
    return q, {n: Region(q, n, names) for n in names}


async def ticks(q: Quorum, rs: dict[str, Region], seconds: float, step: float = TTL / 5) -> None:
    end = q.now + seconds
    while q.now < end:
        for r in rs.values():
            await r.agent.tick()
        q.now += step


def test_a_silent_region_is_failed_over_exactly_once_by_the_majority() -> None:
    async def go() -> None:
        q, rs = regions(["ap", "eu", "us"])
        await ticks(q, rs, 5)
        assert all(r.agent.may_decide() for r in rs.values())
        q.cut.add("ap")
        await ticks(q, rs, TTL + 5)
        assert rs["us"].agent.failovers + rs["eu"].agent.failovers == 1
        assert q.placement is not None and q.placement.epoch == 2
        assert q.placement.moved["ap"] in ("us", "eu")
        for name in ("us", "eu"):
            assert rs[name].agent.placement == q.placement
            assert rs[name].routed[-1] == q.placement
            assert "ap" not in rs[name].sourced  # fenced out of the survivors' streams
            assert rs[name].taken == [("ap", 2)]  # completed once in each survivor
        assert not rs["ap"].agent.may_decide()

    asyncio.run(go())


class RacingWitness(ModelWitness):
    """A witness whose first membership or liveness read of a tick is followed at once by a
    peer's first keepalive: the peer starts while this region looks."""

    def __init__(self, q: Quorum, region: str, starting: Witness) -> None:
        super().__init__(q, region)
        self.starting: Witness | None = starting

    async def _then_start(self) -> None:
        if self.starting is not None:
            starting, self.starting = self.starting, None
            await starting.keepalive()

    async def alive(self) -> set[str]:
        got = await super().alive()
        await self._then_start()
        return got

    async def members(self) -> set[str]:
        got = await super().members()
        await self._then_start()
        return got


def test_a_region_starting_while_a_peer_looks_is_not_failed_over() -> None:
    async def go() -> None:
        q, rs = regions(["eu", "us"])
        us = rs["us"].agent
        us.witness = RacingWitness(q, "us", rs["eu"].agent.witness)
        await us.tick()
        await rs["eu"].agent.tick()
        assert q.placement is not None and q.placement.epoch == 1
        assert us.failovers == 0 and rs["us"].taken == []

    asyncio.run(go())


def test_a_cut_off_region_stops_deciding_before_its_lease_can_expire() -> None:
    async def go() -> None:
        q, rs = regions(["eu", "us"])
        await ticks(q, rs, 5, step=0.5)
        q.cut.add("us")
        last_renewal = max(exp for reg, exp in q.leases.values() if reg == "us") - TTL
        while q.now < last_renewal + TTL + 1:
            q.expire()
            holds = any(reg == "us" for reg, _exp in q.leases.values())
            assert holds or not rs["us"].agent.may_decide()
            await rs["us"].agent.tick()
            q.now += 0.1
        assert not rs["us"].agent.may_decide()
        assert rs["us"].agent.lease_left_s() == 0.0

    asyncio.run(go())


def test_the_share_of_a_lease_a_process_uses_counts_from_before_the_renewal_was_sent() -> None:
    async def go() -> None:
        q, rs = regions(["eu", "us"])
        us = rs["us"].agent
        await us.tick()
        assert us.lease_left_s() == SAFE_SHARE * TTL
        q.now += SAFE_SHARE * TTL - 0.01
        assert us.may_decide()
        q.now += 0.02
        assert not us.may_decide()

    asyncio.run(go())


def test_a_region_back_from_a_cut_adopts_the_new_map_before_it_decides() -> None:
    async def go() -> None:
        q, rs = regions(["eu", "us"])
        await ticks(q, rs, 5)
        q.cut.add("us")
        await ticks(q, {"eu": rs["eu"]}, TTL + 5)
        assert q.placement is not None and q.placement.moved == {"us": "eu"}
        q.cut.clear()
        us = rs["us"]
        await us.agent.tick()
        assert us.agent.may_decide()
        assert us.routed[-1].moved == {"us": "eu"}  # the router knows: us's users go to eu
        assert (await us.store.placement()) == q.placement
        assert us.sourced == ["eu"]  # a moved region fences nobody
        assert us.agent.failovers == 0

    asyncio.run(go())


def test_without_a_majority_nothing_is_failed_over_and_both_sides_fence() -> None:
    async def go() -> None:
        q, rs = regions(["eu", "us"])
        await ticks(q, rs, 5)
        q.cut.update({"us", "eu"})  # the witness lost, and the two cut from each other
        await ticks(q, rs, 3 * TTL)
        assert q.placement is not None and q.placement.epoch == 1
        assert not rs["us"].agent.may_decide() and not rs["eu"].agent.may_decide()
        q.cut.clear()
        q.elect()
        await ticks(q, rs, 1)
        assert rs["us"].agent.may_decide() and rs["eu"].agent.may_decide()
        assert q.placement.epoch == 1  # the lapsed leases came back before anyone decided

    asyncio.run(go())


def test_a_source_is_fenced_once_when_its_region_moves_not_at_every_tick() -> None:
    async def go() -> None:
        q, rs = regions(["eu", "us"])
        await ticks(q, rs, 5)
        q.cut.add("us")
        await ticks(q, {"eu": rs["eu"]}, TTL + 5)
        assert rs["eu"].sourced == []
        rs["eu"].sourced = ["us"]  # the rejoin sources us again
        await ticks(q, {"eu": rs["eu"]}, 5)
        assert rs["eu"].sourced == ["us"]

    asyncio.run(go())


def test_an_operators_newer_map_is_published_to_the_quorum() -> None:
    async def go() -> None:
        q, rs = regions(["eu", "us"])
        await ticks(q, rs, 2)
        manual = Placement.initial(["eu", "us"]).failover("us", "eu", 1.0)
        await rs["eu"].store.put_placement(manual)
        await ticks(q, rs, 2)
        assert q.placement == manual
        assert rs["us"].routed[-1] == manual

    asyncio.run(go())
