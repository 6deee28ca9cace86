"""Regions: where a user's toggles are decided, how counts from every region merge, and who wins
when two regions decided the same (user, item).

No I/O here. A *placement* names each user's home region: the only region that decides that
user's toggles while the placement's epoch is current. By default the home is a stable hash of
the user id over the sorted region names; ``overrides`` pin single users; ``moved`` sends every
user of a failed region to a survivor. Each change (failover, override, return) makes a new
placement with the next epoch, and the newest epoch wins wherever two copies meet.

A count, seen from one region, is the sum of one *part* per origin region: the net of the
changes decided there. Each origin is the only writer of its part, so a part is a register
versioned by its origin's position (how far the origin's log has been applied); merging two
views takes, per origin, the part with the higher version. That merge is commutative,
associative and idempotent (``tests/core/test_regions.py`` checks it as a property), so regions
that applied the logs in any order and any number of times agree once they hold the same
positions.

Conflicts exist only across a failover: a region that lost its users may come back with changes
it acknowledged but never replicated. ``rejoin_decision`` says what becomes of each.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from tally.core.errors import InvalidInput

Part = tuple[int, int]  # (version: the origin's applied log position, value: net count)
Parts = Mapping[str, Part]  # origin region -> its part


def merge_parts(a: Parts, b: Parts) -> dict[str, Part]:
    """Per origin, the part with the higher version (equal versions hold equal values)."""
    out = dict(a)
    for origin, part in b.items():
        mine = out.get(origin)
        if mine is None or part > mine:
            out[origin] = part
    return out


def total(parts: Parts) -> int:
    return sum(value for _version, value in parts.values())


def hash_home(user: str, regions: tuple[str, ...]) -> str:
    """Stable across processes and releases (BLAKE2b, not Python's salted hash)."""
    digest = hashlib.blake2b(user.encode(), digest_size=8).digest()
    return regions[int.from_bytes(digest, "big") % len(regions)]


@dataclass(frozen=True)
class Placement:
    """Which region decides each user's toggles, as of ``epoch``."""

    regions: tuple[str, ...]  # sorted: every region hashes a user to the same home
    epoch: int = 1
    moved: Mapping[str, str] = field(default_factory=dict)  # failed region -> survivor
    overrides: Mapping[str, str] = field(default_factory=dict)  # user -> region
    since: float = 0.0  # wall clock when this epoch began (decisions after it are newer)

    def __post_init__(self) -> None:
        if not self.regions or list(self.regions) != sorted(set(self.regions)):
            raise InvalidInput("regions must be a sorted list of distinct names", "regions")
        for r in [*self.moved, *self.moved.values(), *self.overrides.values()]:
            if r not in self.regions:
                raise InvalidInput(f"unknown region {r!r}", "placement")

    @classmethod
    def initial(cls, regions: Iterable[str]) -> Placement:
        return cls(tuple(sorted(set(regions))))

    def home_of(self, user: str) -> str:
        home = self.overrides.get(user) or hash_home(user, self.regions)
        return self.moved.get(home, home)

    def serving(self) -> list[str]:
        """Regions that are home to some users now."""
        return [r for r in self.regions if r not in self.moved]

    def failover(self, failed: str, to: str, now: float) -> Placement:
        """A new epoch in which ``to`` decides for every user ``failed`` decided for."""
        if failed == to or to in self.moved:
            raise InvalidInput(f"cannot fail {failed} over to {to}", "to")
        moved = {src: (to if dst == failed else dst) for src, dst in self.moved.items()}
        moved[failed] = to
        # Overrides stay: ``moved`` applies after them, and a restore brings them back.
        return Placement(self.regions, self.epoch + 1, moved, dict(self.overrides), now)

    def restore(self, region: str, now: float) -> Placement:
        """A new epoch in which ``region`` decides again for the users it hashes to."""
        moved = {src: dst for src, dst in self.moved.items() if src != region}
        return Placement(self.regions, self.epoch + 1, moved, dict(self.overrides), now)

    def restore_all(self) -> Placement:
        """This map without its failovers: where each user lives when every region serves."""
        return Placement(self.regions, self.epoch, {}, dict(self.overrides), self.since)

    def override(self, user: str, region: str, now: float) -> Placement:
        return Placement(self.regions, self.epoch + 1, dict(self.moved),
                         {**self.overrides, user: region}, now)

    def to_json(self) -> dict[str, Any]:
        return {"regions": list(self.regions), "epoch": self.epoch, "moved": dict(self.moved),
                "overrides": dict(self.overrides), "since": self.since}

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Placement:
        return cls(tuple(body["regions"]), int(body["epoch"]), dict(body.get("moved", {})),
                   dict(body.get("overrides", {})), float(body.get("since", 0.0)))


def newest(*placements: Placement | None) -> Placement | None:
    """The placement with the highest epoch: what two regions agree on when they meet."""
    known = [p for p in placements if p is not None]
    return max(known, key=lambda p: p.epoch) if known else None


class Rejoin(StrEnum):
    AGREE = "agree"  # the survivor already holds this state: nothing to do
    APPLY = "apply"  # no newer decision: the survivor takes the change as its own
    CONFLICT = "conflict"  # the survivor decided this (user, item) after the failover: listed


def rejoin_decision(event_on: bool, event_ts: float, record_on: bool | None,
                    record_ts: float | None, epoch_since: float) -> Rejoin:
    """What a survivor does with a change the returned region acknowledged but never replicated.

    ``record_*`` is the survivor's record of that (user, item) (None: it has none); a record
    written at or after ``epoch_since`` is a decision of the new epoch and wins; an older one
    is the old epoch's replicated state, which the late change simply follows.
    """
    if bool(record_on) == event_on:
        return Rejoin.AGREE
    if record_ts is not None and record_ts >= epoch_since:
        return Rejoin.CONFLICT
    return Rejoin.APPLY
