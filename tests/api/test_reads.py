"""Read endpoints: counts (one item, a batch), has-liked, rollups, admin hot and reconcile."""

from __future__ import annotations

import time
from typing import Any

import httpx
import orjson
import pytest

from tally.settings import Settings
from tests.helpers import db_exec, recount, runtime_of, stored

pytestmark = pytest.mark.anyio

ALL_ZERO = {"like": 0, "save": 0, "view": 0, "share": 0}


async def seed(client: httpx.AsyncClient) -> None:
    """post:1 has 3 likes and 1 save, post:2 one like and 2 views; applied to the count table."""
    ops: list[dict[str, Any]] = [
        {"op": "like", "user_id": u, "item_type": "post", "item_id": 1} for u in range(3)]
    ops += [{"op": "set", "counter": "save", "user_id": 1, "item_type": "post", "item_id": 1},
            {"op": "like", "user_id": 1, "item_type": "post", "item_id": "2", "region": "eu"},
            {"op": "incr", "counter": "view", "item_type": "post", "item_id": 2, "n": 2}]
    r = await client.post("/v1/bulk", json={"ops": ops})
    assert r.status_code == 200
    await runtime_of(client).aggregator.drain()


def items(*ids: Any, item_type: str = "post") -> list[dict[str, Any]]:
    return [{"item_type": item_type, "item_id": i} for i in ids]


async def test_one_item_counts(client: httpx.AsyncClient) -> None:
    await seed(client)
    r = await client.get("/v1/items/post/1/counts")
    assert r.json() == {"item_type": "post", "item_id": "1",
                        "counts": {**ALL_ZERO, "like": 3, "save": 1}}
    r = await client.get("/v1/items/post/2/counts", params=[("counter", "view"),
                                                             ("counter", "like")])
    assert r.json()["counts"] == {"view": 2, "like": 1}
    r = await client.get("/v1/items/comment/never-seen/counts")
    assert r.json()["counts"] == ALL_ZERO


async def test_one_item_counts_bad_input(client: httpx.AsyncClient) -> None:
    for path, params, field in (("/v1/items/post/1/counts", {"counter": "nope"}, "counter[0]"),
                                ("/v1/items/nope/1/counts", {}, "items[0].item_type"),
                                ("/v1/items/post/bad%20id/counts", {}, "items[0].item_id"),
                                ("/v1/items/post/" + "x" * 65 + "/counts", {},
                                 "items[0].item_id")):
        r = await client.get(path, params=params)
        assert r.status_code == 422, (path, r.text)
        assert r.json()["error"]["field"] == field


async def test_batch_counts(client: httpx.AsyncClient) -> None:
    await seed(client)
    r = await client.post("/v1/counts", json={"items": items(2, "1", "zz", 1)})
    assert r.status_code == 200
    assert r.json()["results"] == [
        {"item_type": "post", "item_id": "2", "counts": {**ALL_ZERO, "like": 1, "view": 2}},
        {"item_type": "post", "item_id": "1", "counts": {**ALL_ZERO, "like": 3, "save": 1}},
        {"item_type": "post", "item_id": "zz", "counts": ALL_ZERO},
        {"item_type": "post", "item_id": "1", "counts": {**ALL_ZERO, "like": 3, "save": 1}}]
    r = await client.post("/v1/counts", json={"items": items(1, 2), "counters": ["save"]})
    assert [x["counts"] for x in r.json()["results"]] == [{"save": 1}, {"save": 0}]
    r = await client.post("/v1/counts", json={"items": []})
    assert r.json() == {"results": []}


async def test_batch_counts_with_the_viewers_states(client: httpx.AsyncClient) -> None:
    """A feed in one request: counts plus, for the named user, each requested toggle's state."""
    await seed(client)
    r = await client.post("/v1/counts", json={"items": items(1, 2, 3), "user_id": 1})
    assert r.status_code == 200
    assert r.json()["results"] == [
        {"item_type": "post", "item_id": "1", "counts": {**ALL_ZERO, "like": 3, "save": 1},
         "has": {"like": True, "save": True}},
        {"item_type": "post", "item_id": "2", "counts": {**ALL_ZERO, "like": 1, "view": 2},
         "has": {"like": True, "save": False}},
        {"item_type": "post", "item_id": "3", "counts": ALL_ZERO,
         "has": {"like": False, "save": False}}]
    r = await client.post("/v1/counts", json={"items": items(1, 2), "counters": ["like", "view"],
                                              "user_id": "2"})
    assert [(x["counts"], x["has"]) for x in r.json()["results"]] == [
        ({"like": 3, "view": 0}, {"like": True}), ({"like": 1, "view": 2}, {"like": False})]
    r = await client.post("/v1/counts", json={"items": items(1), "counters": ["view"],
                                              "user_id": 1})
    assert r.json()["results"][0]["has"] == {}  # no toggle asked for: nothing to say
    for bad in (None, "a/b", 2**63, True, [1]):
        r = await client.post("/v1/counts", json={"items": items(1), "user_id": bad})
        if bad is None:  # JSON null is the same as leaving it out
            assert r.status_code == 200 and "has" not in r.json()["results"][0]
            continue
        assert (r.status_code, r.json()["error"]["field"]) == (422, "user_id"), bad


async def test_batch_counts_limits_and_errors(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/counts", json={"items": items(*range(500))})
    assert r.status_code == 200 and len(r.json()["results"]) == 500
    cases: list[tuple[dict[str, Any], str]] = [
        ({"items": items(*range(501))}, "items"),
        ({"items": items(1), "counters": ["like", "nope"]}, "counters[1]"),
        ({"items": items(1), "counters": [5]}, "counters[0]"),
        ({"items": [*items(1), {"item_type": "nope", "item_id": 1}]}, "items[1].item_type"),
        ({"items": [*items(1), {"item_type": "post", "item_id": 1.5}]}, "items[1].item_id"),
        ({"items": [{"item_type": "post"}]}, "items[0].item_id"),
        ({"items": {"item_type": "post", "item_id": 1}}, "items"),
    ]
    for req, field in cases:
        r = await client.post("/v1/counts", json=req)
        assert r.status_code == 422, (req, r.text)
        assert r.json()["error"]["field"] == field, req
    r = await client.post("/v1/counts", json={"items": items(*range(501))})
    assert r.json()["error"]["code"] == "limit_exceeded"


async def test_has_one_and_many(client: httpx.AsyncClient) -> None:
    await seed(client)
    r = await client.get("/v1/has/like/1/post/1")
    assert r.json() == {"item_type": "post", "item_id": "1", "on": True}
    r = await client.get("/v1/has/save/2/post/1")
    assert r.json()["on"] is False
    r = await client.post("/v1/has", json={"user_id": "1", "items": items(3, 2, 1, "2")})
    assert r.json() == {"counter": "like", "user_id": "1", "results": [
        {"item_type": "post", "item_id": "3", "on": False},
        {"item_type": "post", "item_id": "2", "on": True},
        {"item_type": "post", "item_id": "1", "on": True},
        {"item_type": "post", "item_id": "2", "on": True}]}
    r = await client.post("/v1/has", json={"user_id": 1, "counter": "save", "items": items(1, 2)})
    assert [x["on"] for x in r.json()["results"]] == [True, False]
    r = await client.post("/v1/has", json={"user_id": 1, "items": items(*range(500))})
    assert r.status_code == 200 and len(r.json()["results"]) == 500


async def test_has_bad_input(client: httpx.AsyncClient) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"user_id": 1, "items": items(*range(501))}, "items"),
        ({"user_id": 1, "counter": "view", "items": items(1)}, "counter"),
        ({"user_id": 1, "counter": "nope", "items": items(1)}, "counter"),
        ({"user_id": None, "items": items(1)}, "user_id"),
        ({"user_id": "a/b", "items": items(1)}, "user_id"),
        ({"user_id": 2**63, "items": items(1)}, "user_id"),
        ({"items": items(1)}, "user_id"),
        ({"user_id": 1, "items": items("ü")}, "items[0].item_id"),
    ]
    for req, field in cases:
        r = await client.post("/v1/has", json=req)
        assert r.status_code == 422, (req, r.text)
        assert r.json()["error"]["field"] == field, req
    for path, field in (("/v1/has/view/1/post/1", "counter"), ("/v1/has/like/a%20b/post/1",
                                                                "user_id"),
                        ("/v1/has/like/1/nope/1", "items[0].item_type")):
        r = await client.get(path)
        assert (r.status_code, r.json()["error"]["field"]) == (422, field), path


async def test_rollups(client: httpx.AsyncClient) -> None:
    await seed(client)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    r = await client.get("/v1/rollups/like/post/day")
    assert r.json() == {"counter": "like", "item_type": "post", "dimension": "day",
                        "buckets": {today: 4}}
    r = await client.get("/v1/rollups/like/post/region")
    assert r.json()["buckets"] == {"local": 3, "eu": 1}
    r = await client.get("/v1/rollups/view/post/region")
    assert r.json()["buckets"] == {"local": 2}
    r = await client.get("/v1/rollups/share/reel/day")
    assert r.json()["buckets"] == {}
    for path, field in (("/v1/rollups/nope/post/day", "counter"),
                        ("/v1/rollups/like/nope/day", "item_type"),
                        ("/v1/rollups/like/post/week", "dimension")):
        r = await client.get(path)
        assert (r.status_code, r.json()["error"]["field"]) == (422, field), path


async def test_admin_hot(client: httpx.AsyncClient) -> None:
    for _ in range(20):
        await client.post("/v1/counts", json={"items": items("viral", 1)})
    await client.get("/v1/items/post/2/counts")
    r = await client.get("/v1/admin/hot")
    body = r.json()
    assert body["total"] >= 41
    top = body["items"][0]
    assert top["item"] == "post:viral" and top["estimate"] >= 20 * 4
    assert {i["item"] for i in body["items"]} >= {"post:viral", "post:1", "post:2"}


def lines(r: httpx.Response) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in r.text.splitlines() if line.strip()]


async def test_reconcile_streams_progress_and_repairs(client: httpx.AsyncClient,
                                                      settings: Settings) -> None:
    await seed(client)
    db = settings.sqlite_path
    db_exec(db, "UPDATE counts SET count=9 WHERE item='post:1' AND counter='like'")
    r = await client.post("/v1/admin/reconcile", json={"repair": False})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    out = lines(r)
    assert out[-1]["done"] is True and out[-1]["checked"] == 3
    assert [d for x in out for d in x["drifts"]] == [
        {"counter": "like", "item": "post:1", "stored": 9, "actual": 3}]
    assert stored(db)[("like", "post:1")] == 9  # dry run
    r = await client.post("/v1/admin/reconcile", json={"items": items(1)})
    assert stored(db)[("like", "post:1")] == 9  # no "repair": a dry run too
    r = await client.post("/v1/admin/reconcile", json={"items": items(1), "repair": True})
    assert [d["item"] for x in lines(r) for d in x["drifts"]] == ["post:1"]
    assert {k: v for k, v in stored(db).items() if k[0] != "view"} == recount(db)
    r = await client.get("/v1/items/post/1/counts", params={"counter": "like"})
    assert r.json()["counts"] == {"like": 3}  # the cached 9 was dropped
    r = await client.post("/v1/admin/reconcile", json={"repair": True})
    assert [d for x in lines(r) for d in x["drifts"]] == []


async def test_reconcile_bad_input(client: httpx.AsyncClient) -> None:
    for req, field in (({"items": []}, "items"), ({"items": items("a b")}, "items[0].item_id"),
                       ({"repair": "yes"}, "repair"), ({"repair": 0}, "repair"),
                       ({"items": items(*range(501))}, "items")):
        r = await client.post("/v1/admin/reconcile", json=req)
        assert (r.status_code, r.json()["error"]["field"]) == (422, field), req
