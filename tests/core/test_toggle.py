"""Properties of the toggle rule (tally.core.toggle), against a model that only counts users."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tally.core.toggle import replay, step

ops_ = st.lists(st.booleans(), max_size=40)


def test_step_table() -> None:
    assert [step(False, False), step(False, True), step(True, True), step(True, False)] == [
        0, 1, 0, -1]


@given(st.booleans(), ops_)
def test_final_state_is_the_last_op_and_delta_is_the_state_difference(prior: bool,
                                                                     ops: list[bool]) -> None:
    r = replay(prior, ops)
    assert r.state == (ops[-1] if ops else prior)
    assert r.delta == int(r.state) - int(prior)  # a user counts at most once
    assert len(r.changed) == len(ops)


@given(st.booleans(), ops_)
def test_a_change_is_exactly_an_op_unlike_the_state_before_it(prior: bool, ops: list[bool]) -> None:
    r = replay(prior, ops)
    before = [prior, *ops][:len(ops)]
    assert list(r.changed) == [on != was for on, was in zip(ops, before, strict=True)]
    assert r.changes == sum(1 for on, was in zip(ops, before, strict=True) if on != was)


@given(st.booleans(), ops_, ops_)
def test_replay_composes(prior: bool, first: list[bool], second: list[bool]) -> None:
    """Replaying in two parts (two requests) is replaying in one: what the stores rely on when a
    bulk and a later request touch the same toggle."""
    a = replay(prior, first)
    b = replay(a.state, second)
    whole = replay(prior, first + second)
    assert (whole.state, whole.changed, whole.delta) == (b.state, a.changed + b.changed,
                                                        a.delta + b.delta)


@given(st.booleans(), ops_)
def test_repeating_each_op_adds_no_change(prior: bool, ops: list[bool]) -> None:
    """A client retry (each op sent twice) changes nothing more than the op once."""
    doubled = [on for op in ops for on in (op, op)]
    once, twice = replay(prior, ops), replay(prior, doubled)
    assert (twice.state, twice.delta, twice.changes) == (once.state, once.delta, once.changes)
