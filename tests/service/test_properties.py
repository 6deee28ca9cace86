"""Property: any interleaving of likes, unlikes, repeats and retries ends exact.

Ops arrive in rounds; the ops of one round run concurrently (a retry is the same op sent twice at
once), through the service layer, as single writes or as one bulk write. After the aggregator
drains, every count equals the recount from the toggle records and the expected model, and
has-liked is each user's last operation.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import anyio
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.bootstrap import build
from tally.core.model import OpResult, ToggleOp
from tally.service.counters import CounterService
from tally.settings import Settings
from tests.helpers import recount

USERS, ITEMS = 8, 4

# One round: (user, item) -> (on, retried); a dict, so each pair has one meaning per round.
op_value = st.tuples(st.booleans(), st.booleans())
round_ = st.dictionaries(st.tuples(st.integers(0, USERS - 1), st.integers(0, ITEMS - 1)),
                         op_value, min_size=1, max_size=10)
plan = st.lists(st.tuples(round_, st.booleans()), min_size=1, max_size=12)

Round = dict[tuple[int, int], tuple[bool, bool]]


async def run_round(svc: CounterService, ops: Round, as_bulk: bool) -> list[OpResult]:
    built = [(svc.toggle_op("like", "post", item, str(user) if user % 2 else user, on), retried)
             for (user, item), (on, retried) in ops.items()]
    if as_bulk:
        return await svc.write([op for op, _ in built])
    results: list[OpResult] = []

    async def send(op: ToggleOp) -> None:
        results.extend(await svc.write([op]))

    async with anyio.create_task_group() as tg:
        for op, retried in built:
            tg.start_soon(send, op)
            if retried:  # a client that timed out and sent it again
                tg.start_soon(send, op)
    return results


async def check_plan(data_dir: Path, rounds: list[tuple[Round, bool]]) -> None:
    s = Settings(data_dir=str(data_dir), aggregate_window_ms=1.0)
    rt = build(s)
    await rt.start()
    try:
        svc = rt.service
        state: dict[tuple[int, int], bool] = {}
        for ops, as_bulk in rounds:
            results = await run_round(svc, ops, as_bulk)
            state.update({pair: on for pair, (on, _) in ops.items()})
            if len(ops) == 1 and not any(r for _, r in ops.values()):
                (user, item), _ = next(iter(ops.items()))
                expected = sum(on for (_, i), on in state.items() if i == item)
                assert results[0].count == expected  # read-your-writes, exact
        await rt.aggregator.drain()
        expected_counts = {("like", f"post:{i}"): sum(on for (_, j), on in state.items() if j == i)
                           for i in range(ITEMS)}
        truth = recount(s.sqlite_path)
        assert {k: v for k, v in expected_counts.items() if v} == truth
        items = [f"post:{i}" for i in range(ITEMS)]
        counts = await svc.counts(items, ["like"])
        assert counts == {"like": [expected_counts[("like", i)] for i in items]}
        for user in range(USERS):
            flags = await svc.has("like", user, items)
            assert flags == [state.get((user, i), False) for i in range(ITEMS)]
    finally:
        await rt.stop()


@settings(max_examples=40)
@given(rounds=plan)
def test_any_interleaving_ends_exact(rounds: list[tuple[Round, bool]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        anyio.run(check_plan, Path(tmp), rounds)
