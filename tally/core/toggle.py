"""The toggle rule, stated once: a repeat changes nothing, a reversal is one change.

A toggle is one (counter, user, item) and holds on or off; a never-set toggle is off. Setting it
to the state it holds changes nothing (no count delta, no change-log event); setting it to the
other state is exactly one change, +1 when it turns on, -1 when it turns off. So a user counts at
most once per item and counter however often a client retries, and a count is the number of
toggles that are on.

Every backend applies this rule: the embedded store and the PostgreSQL bulk path call ``step``;
the PostgreSQL one-statement path implements it in SQL (its comment names ``step``), and the
contract test holds each backend to ``replay``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


def step(state: bool, on: bool) -> int:
    """The count delta of setting a toggle that holds ``state`` to ``on``: 0, +1 or -1."""
    if state == on:
        return 0
    return 1 if on else -1


@dataclass(frozen=True, slots=True)
class Replay:
    """The outcome of a sequence of toggle ops on one toggle."""

    state: bool  # the state after the last op
    changed: tuple[bool, ...]  # per op: did it change the state (and so log one event)?
    delta: int  # the count delta of the whole sequence: -1, 0 or +1

    @property
    def changes(self) -> int:
        return sum(self.changed)


def replay(prior: bool, ops: Iterable[bool]) -> Replay:
    """Applies ``ops`` (each the state asked for) in order to a toggle holding ``prior``."""
    state, delta, changed = prior, 0, []
    for on in ops:
        d = step(state, on)
        changed.append(d != 0)
        delta += d
        state = on
    return Replay(state, tuple(changed), delta)
