"""Online resharding (tally/store/postgres/reshard.py): a range of logical shards moved between
two databases while like/unlike and keyed-view load runs, proven with a client ledger; and the
move's refusals of bad requests."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tally.cli import main
from tally.core.errors import InvalidInput
from tally.core.model import ToggleOp
from tally.store.postgres.cluster import PgCluster, ShardMoving
from tally.store.postgres.likes import PostgresLikeStore
from tally.store.postgres.reshard import Move, MoveReport, ShardMover, parse_range
from tally.store.shards import ShardMap
from tests.store.reshard_load import run_move_under_load

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_a_move_under_load_loses_and_doubles_nothing(pg_dsns: list[str],
                                                           nats_engine: object) -> None:
    # Shards 0-15 of 64 leave database 0, the coordinator (whose counts are applied in the
    # aggregators' deciding transaction), for database 1, mid-load.
    result = await run_move_under_load(pg_dsns, nats_engine.url,  # type: ignore[attr-defined]
                                       f"RESHARD{uuid.uuid4().hex[:8]}", shards=64,
                                       move=(0, 15, 1), load_s=5.0, move_after_s=1.5)
    print(json.dumps(result, indent=1))  # the figures docs/scale-out.md quotes
    assert result["ledger"]["acked"] > 200
    assert result["lost_states"] == 0
    assert result["like_mismatches"] == {}  # stored count == ledger == recount, every item
    assert result["view_mismatches"] == {}  # each acknowledged key counted once
    assert result["left_on_source"] == 0 and result["on_target"] > 0
    assert result["epoch"] == 1 and result["api_epochs"] == [1, 1]
    assert result["move"]["write_pause_s"] is not None
    assert result["ledger"]["other_failures"] == 0


async def test_bad_moves_are_refused_with_what_to_do(pg_dsns: list[str]) -> None:
    cluster = PgCluster(pg_dsns, ShardMap.build(64, 2), pool_max=2)
    await cluster.start()
    try:
        mover = ShardMover(cluster)
        for args, message in (((10, 70, 1), "0 <= FIRST <= LAST < 64"),
                              ((20, 10, 1), "0 <= FIRST <= LAST"),
                              ((0, 3, 5), "unknown database 5"),
                              ((30, 40, 0), "on databases \\[0, 1\\]"),
                              ((0, 3, 0), "already on database 0")):
            with pytest.raises(InvalidInput, match=message):
                await mover.plan(*args)
        assert await mover.abort() == "no move in progress"
        async with ShardMover(cluster)._exclusive():  # another mover is running
            with pytest.raises(InvalidInput, match="another tally shards process"):
                await mover.run(await mover.plan(0, 3, 1))
    finally:
        await cluster.close()


def test_a_fenced_write_is_a_retryable_503() -> None:
    refused = ShardMoving("write: logical shard 3 is not held by this database; retry")
    assert (refused.status, dict(refused.headers)[b"retry-after"]) == (503, b"1")


def test_ranges_parse_or_say_how_to_write_them() -> None:
    assert parse_range("0-255") == (0, 255)
    assert parse_range("7") == (7, 7)
    for bad in ("a-b", "3-", "-3", ""):
        with pytest.raises(InvalidInput, match="FIRST-LAST"):
            parse_range(bad)


async def test_the_stored_map_outlives_a_change_of_the_settings(
        pg_database: Callable[[], str]) -> None:
    dsns = [pg_database(), pg_database()]
    first = PgCluster(dsns, ShardMap.build(64, 2), pool_max=2)
    await first.start()
    await first.close()
    dsns.append(pg_database())  # a server added: an even split over three would remap 2/3 of ids
    grown = PgCluster(dsns, ShardMap.build(64, 3), pool_max=2)
    await grown.start()
    try:
        assert (grown.epoch, grown.map.ranges()) == (0, ["0-31=0", "32-63=1"])
        mover = ShardMover(grown)
        move = await mover.plan(48, 63, 2)  # the new server takes shards by a move
        assert (move.source, move.target) == (1, 2)
        assert (await mover.run(move)).epoch == 1
        assert grown.map.ranges() == ["0-31=0", "32-47=1", "48-63=2"]
    finally:
        await grown.close()


def test_the_command_dry_runs_moves_and_reports(pg_dsns: list[str], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "tally.toml"
    config.write_text("[tally]\nbackend = 'cluster'\nlogical_shards = 64\n"
                      f"postgres_dsns = {json.dumps(pg_dsns)}\nlog_level = 'WARNING'\n")
    base = ["shards", "--config", str(config)]
    assert main([*base[:1], "move", "0-15", "--to", "1", "--dry-run", *base[1:]]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["move"] == "logical shards 0-15 from database 0 to database 1"
    assert planned["map_after"] == ["0-15=1", "16-31=0", "32-63=1"]
    assert main([*base[:1], "move", "0-15", "--to", "7", *base[1:]]) == 2
    assert "unknown database 7" in capsys.readouterr().err
    assert main([*base[:1], "move", "0-15", "--to", "1", *base[1:]]) == 0
    assert json.loads(capsys.readouterr().out)["epoch"] == 1
    assert main([*base[:1], "status", *base[1:]]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["map"] == ["0-15=1", "16-31=0", "32-63=1"] and status["active"] is None
    assert status["moves"][0]["step"] == "done"


class _Crash(Exception):
    pass


class _CrashingMover(ShardMover):
    """Dies like a killed process: right after the journal records step ``at`` (or, for "copy",
    in the middle of the copy's catch-up)."""

    def __init__(self, cluster: PgCluster, at: str) -> None:
        super().__init__(cluster)
        self.at = at

    async def _advance(self, report: MoveReport, step: str) -> str:
        done = await super()._advance(report, step)
        if step == self.at:
            raise _Crash(step)
        return done

    async def _switch(self, move: Move, report: MoveReport) -> int:
        epoch = await super()._switch(move, report)  # journals "switched" with the new map
        if self.at == "switched":
            raise _Crash("switched")
        return epoch

    async def _catch_up(self, move: Move, report: MoveReport, until: int) -> int:
        if self.at == "copy":
            raise _Crash("copy")
        return await super()._catch_up(move, report, until)


async def test_a_crashed_move_resumes_at_any_step_or_aborts(pg_dsns: list[str]) -> None:
    cluster = PgCluster(pg_dsns, ShardMap.build(64, 2), pool_max=4)
    likes = PostgresLikeStore(cluster)
    await likes.start()
    users = [f"u{n}" for n in range(120)]
    try:
        await likes.write([ToggleOp("like", f"post:{n % 7}", u, True, "") for n, u in
                           enumerate(users)])
        moving = [u for u in users if 0 <= cluster.map.shard_of(u) <= 15]
        assert moving
        for at, to in (("copy", 1), ("writes_fenced", 0), ("switched", 1), ("released", 0)):
            with pytest.raises(_Crash):
                await _CrashingMover(cluster, at).run(await ShardMover(cluster).plan(0, 15, to))
            if at in ("writes_fenced", "switched"):  # fenced until the move is resumed
                with pytest.raises(ShardMoving):
                    await likes.write([ToggleOp("like", "post:9", moving[0], True, "")])
            mover = ShardMover(cluster)  # a new process runs the same command again
            report = await mover.run(await mover.plan(0, 15, to))
            assert await mover.active() is None
            assert cluster.map.db_of_shard(0) == to, at
            for n, u in enumerate(users):
                assert await likes.has("like", u, [f"post:{n % 7}"]) == [True], (at, u)
            assert report.deleted.get("toggles", 0) > 0 or at == "released", at
        # Abort after the fence: the source takes the range's writes again, the target holds none.
        with pytest.raises(_Crash):
            await _CrashingMover(cluster, "writes_fenced").run(
                await ShardMover(cluster).plan(0, 15, 1))
        assert "aborted" in await ShardMover(cluster).abort()
        await likes.write([ToggleOp("like", "post:9", moving[0], True, "")])
        assert await likes.has("like", moving[0], ["post:9"]) == [True]
        rows = await cluster.fetch(1, "SELECT count(*) FROM toggles WHERE shard <= 15")
        assert rows[0][0] == 0 and cluster.map.db_of_shard(0) == 0
    finally:
        await likes.close()
