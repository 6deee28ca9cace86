"""Write endpoints: like/unlike, set/clear, incr and bulk, through the in-process app."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest

from tally.settings import Settings
from tests.helpers import recount, runtime_of, snapshot, stored

pytestmark = pytest.mark.anyio


def body(user: Any = 1, item_id: Any = 7, item_type: str = "post", **extra: Any) -> dict[str, Any]:
    return {"user_id": user, "item_type": item_type, "item_id": item_id, **extra}


async def test_like_unlike_round_trip(client: httpx.AsyncClient) -> None:
    answers = []
    for path, user in (("/v1/like", 1), ("/v1/like", 1), ("/v1/like", "u-2"), ("/v1/unlike", 1),
                       ("/v1/unlike", 1)):
        r = await client.post(path, json=body(user))
        assert r.status_code == 200, r.text
        answers.append((r.json()["state"], r.json()["changed"], r.json()["count"]))
    assert answers == [(True, True, 1), (True, False, 1), (True, True, 2), (False, True, 1),
                       (False, False, 1)]
    r = await client.post("/v1/unlike", json=body("u-2", "x.y:z-1_"))
    assert r.json() == {"counter": "like", "item_type": "post", "item_id": "x.y:z-1_",
                        "user_id": "u-2", "state": False, "changed": False, "count": 0}


async def test_int_and_string_ids_are_one_id(client: httpx.AsyncClient) -> None:
    await client.post("/v1/like", json=body(42, 9))
    r = await client.post("/v1/like", json=body("42", "9"))
    assert (r.json()["changed"], r.json()["count"]) == (False, 1)
    big = 2**63 - 1
    r = await client.post("/v1/like", json=body(-(2**63), big))
    assert (r.json()["user_id"], r.json()["item_id"]) == (str(-(2**63)), str(big))


async def test_read_your_writes_before_the_aggregator(client: httpx.AsyncClient,
                                                      settings: Settings) -> None:
    rt = runtime_of(client)
    await rt.aggregator.stop()  # nothing is applied from here on
    counts = [(await client.post("/v1/like", json=body(u, "hot"))).json()["count"]
              for u in range(5)]
    assert counts == [1, 2, 3, 4, 5]
    assert stored(settings.sqlite_path) == {}  # the answers came from the log, not the table
    r = await client.post("/v1/unlike", json=body(0, "hot"))
    assert r.json()["count"] == 4
    rt.aggregator.start()


async def test_concurrent_likes_answer_every_count_once(client: httpx.AsyncClient) -> None:
    counts: list[int] = []

    async def one(user: int) -> None:
        r = await client.post("/v1/like", json=body(user, "feed"))
        counts.append(r.json()["count"])

    async with anyio.create_task_group() as tg:
        for user in range(50):
            tg.start_soon(one, user)
    assert sorted(counts) == list(range(1, 51))


async def test_set_and_clear_any_toggle(client: httpx.AsyncClient, settings: Settings) -> None:
    r = await client.post("/v1/counters/save/set", json=body(1, 3, "reel", region="eu"))
    assert r.status_code == 200
    assert r.json() == {"counter": "save", "item_type": "reel", "item_id": "3", "user_id": "1",
                        "state": True, "changed": True, "count": 1}
    r = await client.post("/v1/counters/like/set", json=body(1, 3, "reel"))
    assert (r.json()["counter"], r.json()["count"]) == ("like", 1)
    r = await client.post("/v1/counters/save/clear", json=body(1, 3, "reel"))
    assert (r.json()["state"], r.json()["changed"], r.json()["count"]) == (False, True, 0)
    assert recount(settings.sqlite_path) == {("like", "reel:3"): 1}


async def test_incr_with_idempotency_key(client: httpx.AsyncClient) -> None:
    path = "/v1/counters/view/incr"
    r = await client.post(path, json={"item_type": "post", "item_id": 1})
    assert r.json() == {"counter": "view", "item_type": "post", "item_id": "1", "applied": True,
                        "count": 1}
    r = await client.post(path, json={"item_type": "post", "item_id": 1, "n": 5,
                                      "idempotency_key": "req-1", "user_id": 3, "region": "eu"})
    assert (r.json()["applied"], r.json()["count"]) == (True, 6)
    r = await client.post(path, json={"item_type": "post", "item_id": 1, "n": 5,
                                      "idempotency_key": "req-1"})
    assert (r.json()["applied"], r.json()["count"]) == (False, 6)
    r = await client.post("/v1/counters/share/incr", json={"item_type": "post", "item_id": 1,
                                                           "idempotency_key": "req-1"})
    assert (r.json()["applied"], r.json()["count"]) == (True, 1)  # keys are per counter


@pytest.mark.parametrize("n", [0, -1, 1_000_000_001, 2**63 - 1, 2**64, 1.5, "3", True, None])
async def test_incr_n_limits(client: httpx.AsyncClient, settings: Settings, n: Any) -> None:
    before = snapshot(settings.sqlite_path)
    r = await client.post("/v1/counters/view/incr", json={"item_type": "post", "item_id": 1,
                                                          "n": n})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "n"
    assert snapshot(settings.sqlite_path) == before


async def test_incr_largest_n_twice_reads_back(client: httpx.AsyncClient) -> None:
    for _ in range(2):
        r = await client.post("/v1/counters/view/incr", json={"item_type": "post", "item_id": 1,
                                                              "n": 1_000_000_000})
        assert r.status_code == 200
    await runtime_of(client).aggregator.drain()
    r = await client.get("/v1/items/post/1/counts", params={"counter": "view"})
    assert r.json()["counts"] == {"view": 2_000_000_000}


async def test_bulk_mixed_ops_have_one_result_each(client: httpx.AsyncClient) -> None:
    ops = [{"op": "like", "user_id": 1, "item_type": "post", "item_id": 1},
           {"op": "like", "user_id": 1, "item_type": "post", "item_id": 1},
           {"op": "set", "counter": "save", "user_id": 1, "item_type": "post", "item_id": 1},
           {"op": "unlike", "user_id": 2, "item_type": "post", "item_id": 1},
           {"op": "incr", "counter": "view", "item_type": "post", "item_id": 1, "n": 4},
           {"op": "incr", "counter": "view", "item_type": "post", "item_id": 1,
            "idempotency_key": "b1"},
           {"op": "incr", "counter": "view", "item_type": "post", "item_id": 1,
            "idempotency_key": "b1"},
           {"op": "clear", "counter": "save", "user_id": "1", "item_type": "post", "item_id": "1"}]
    r = await client.post("/v1/bulk", json={"ops": ops})
    assert r.status_code == 200, r.text
    assert [(x["changed"], x["count"], x["state"]) for x in r.json()["results"]] == [
        (True, 1, True), (False, 1, True), (True, 1, True), (False, 1, False), (True, 4, None),
        (True, 5, None), (False, 5, None), (True, 0, False)]


async def test_bulk_limit(client: httpx.AsyncClient, settings: Settings) -> None:
    ops = [{"op": "like", "user_id": u, "item_type": "post", "item_id": 1} for u in range(1000)]
    r = await client.post("/v1/bulk", json={"ops": ops})
    assert r.status_code == 200
    assert r.json()["results"][-1]["count"] == 1000
    await runtime_of(client).aggregator.drain()  # so that only the refused requests could write
    before = snapshot(settings.sqlite_path)
    r = await client.post("/v1/bulk", json={"ops": [*ops, ops[0]]})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "limit_exceeded"
    assert r.json()["error"]["field"] == "ops"
    r = await client.post("/v1/bulk", json={"ops": []})
    assert (r.status_code, r.json()["error"]["field"]) == (422, "ops")
    assert snapshot(settings.sqlite_path) == before


@pytest.mark.parametrize(("bad", "field"), [
    ({"op": "like", "user_id": 1, "item_type": "nope", "item_id": 1}, "ops[3].item_type"),
    ({"op": "like", "user_id": True, "item_type": "post", "item_id": 1}, "ops[3].user_id"),
    ({"op": "like", "user_id": 1, "item_type": "post", "item_id": "a b"}, "ops[3].item_id"),
    ({"op": "like", "user_id": 1, "item_type": "post"}, "ops[3].item_id"),
    ({"op": "set", "counter": "view", "user_id": 1, "item_type": "post", "item_id": 1},
     "ops[3].counter"),
    ({"op": "incr", "counter": "like", "item_type": "post", "item_id": 1}, "ops[3].counter"),
    ({"op": "incr", "counter": "view", "item_type": "post", "item_id": 1, "n": 0}, "ops[3].n"),
    ({"op": "incr", "counter": "view", "item_type": "post", "item_id": 1,
      "idempotency_key": ""}, "ops[3].idempotency_key"),
    ({"op": "like", "user_id": 1, "item_type": "post", "item_id": 1, "region": 5},
     "ops[3].region"),
    ({"op": "explode", "user_id": 1, "item_type": "post", "item_id": 1}, "ops[3].op"),
    ({"user_id": 1, "item_type": "post", "item_id": 1}, "ops[3].op"),
])
async def test_bulk_one_bad_op_writes_nothing(client: httpx.AsyncClient, settings: Settings,
                                              bad: dict[str, Any], field: str) -> None:
    good = [{"op": "like", "user_id": u, "item_type": "post", "item_id": 1} for u in range(3)]
    before = snapshot(settings.sqlite_path)
    r = await client.post("/v1/bulk", json={"ops": [*good, bad, *good]})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field
    assert set(r.json()["error"]) == {"code", "message", "field"}
    assert snapshot(settings.sqlite_path) == before


@pytest.mark.parametrize("ops", [[1, 2], ["like"], [None], [[]]])
async def test_bulk_ops_must_be_objects(client: httpx.AsyncClient, settings: Settings,
                                        ops: list[Any]) -> None:
    before = snapshot(settings.sqlite_path)
    r = await client.post("/v1/bulk", json={"ops": ops})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "ops[0]"
    assert snapshot(settings.sqlite_path) == before


@pytest.mark.parametrize(("body", "field"), [({"ops": "like"}, "ops"), ({}, "ops"),
                                             ({"ops": [], "dry_run": True}, "dry_run"),
                                             ([{"op": "like"}], "body")])
async def test_bulk_body_shape(client: httpx.AsyncClient, body: Any, field: str) -> None:
    r = await client.post("/v1/bulk", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field
