"""Bad input anywhere: a 4xx JSON error naming the field, never a 500, never a partial write."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tally.settings import Settings
from tests.helpers import snapshot

pytestmark = pytest.mark.anyio

GOOD = {"user_id": 1, "item_type": "post", "item_id": 7}
WRITES = ["/v1/like", "/v1/unlike", "/v1/counters/save/set", "/v1/counters/like/clear"]

# 1.0 is no bad id: JSON Schema's "integer" (the OpenAPI document's) includes it, so it is 1.
BAD_IDS: list[Any] = ["x" * 65, "", "a b", "a/b", "naïve", "emoji🙂", 2**63, -(2**63) - 1, True,
                      False, 3.5, 2.0**63, None, [1], {"id": 1}]


def check_error(r: httpx.Response, status: int, field: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err: dict[str, Any] = r.json()["error"]
    assert isinstance(err["code"], str) and isinstance(err["message"], str) and err["message"]
    if field is not None:
        assert err["field"] == field, err
    return err


@pytest.fixture
async def guarded(client: httpx.AsyncClient, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The client, and after the test: the database is exactly as before it."""
    before = snapshot(settings.sqlite_path)
    yield client
    assert snapshot(settings.sqlite_path) == before


@pytest.mark.parametrize("path", WRITES)
@pytest.mark.parametrize("field", ["user_id", "item_id"])
async def test_malformed_ids(guarded: httpx.AsyncClient, path: str, field: str) -> None:
    for bad in BAD_IDS:
        check_error(await guarded.post(path, json={**GOOD, field: bad}), 422, field)


async def test_unknown_names(guarded: httpx.AsyncClient) -> None:
    check_error(await guarded.post("/v1/like", json={**GOOD, "item_type": "video"}), 422,
                "item_type")
    check_error(await guarded.post("/v1/like", json={**GOOD, "item_type": "Post"}), 422,
                "item_type")
    for path in ("/v1/counters/nope/set", "/v1/counters/view/set", "/v1/counters/like/incr",
                 "/v1/counters/nope/incr"):
        body = GOOD if path.endswith("set") else {"item_type": "post", "item_id": 1}
        check_error(await guarded.post(path, json=body), 422, "counter")


@pytest.mark.parametrize(("body", "field"), [
    ({"user_id": 1, "item_type": "post"}, "item_id"),
    ({"item_type": "post", "item_id": 1}, "user_id"),
    ({**GOOD, "item_type": 5}, "item_type"),
    ({**GOOD, "item_type": None}, "item_type"),
    ({**GOOD, "region": 5}, "region"),
    ({**GOOD, "region": ""}, "region"),
    ({**GOOD, "region": "r" * 33}, "region"),
    ({**GOOD, "surprise": 1}, "surprise"),
    ([GOOD], "body"),
    ("like", "body"),
    (None, "body"),
])
async def test_wrong_shapes(guarded: httpx.AsyncClient, body: Any, field: str) -> None:
    check_error(await guarded.post("/v1/like", json=body), 422, field)


@pytest.mark.parametrize(("body", "field"), [
    ({"item_type": "post", "item_id": 1, "idempotency_key": ""}, "idempotency_key"),
    ({"item_type": "post", "item_id": 1, "idempotency_key": "k" * 129}, "idempotency_key"),
    ({"item_type": "post", "item_id": 1, "idempotency_key": 5}, "idempotency_key"),
    ({"item_type": "post", "item_id": 1, "user_id": 1.5}, "user_id"),
    ({"item_type": "post", "item_id": True}, "item_id"),
    ({"item_type": "post", "item_id": 1, "n": "2"}, "n"),
])
async def test_incr_wrong_types(guarded: httpx.AsyncClient, body: Any, field: str) -> None:
    check_error(await guarded.post("/v1/counters/view/incr", json=body), 422, field)


@pytest.mark.parametrize("path", [*WRITES, "/v1/counters/view/incr", "/v1/bulk", "/v1/counts",
                                  "/v1/has", "/v1/admin/reconcile"])
async def test_invalid_json(guarded: httpx.AsyncClient, path: str) -> None:
    for raw in (b"{", b'{"user_id": 1,}', b"\xff\xfe", b"nul"):
        r = await guarded.post(path, content=raw, headers={"content-type": "application/json"})
        check_error(r, 400, "body")


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x", "application/xml"])
async def test_wrong_content_type(guarded: httpx.AsyncClient, ctype: str) -> None:
    for path in ("/v1/like", "/v1/bulk", "/v1/counts"):
        body = b'{"user_id": 1, "item_type": "post", "item_id": 7}'
        r = await guarded.post(path, content=body, headers={"content-type": ctype})
        assert r.status_code in (415, 422), r.text
        check_error(r, r.status_code, "body")


async def test_json_with_a_charset_is_fine(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/like", content=b'{"user_id": 1, "item_type": "post", "item_id": 7}',
                          headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200


@pytest.mark.parametrize("path", ["/v1/like", "/v1/bulk", "/v1/counts", "/v1/admin/reconcile"])
async def test_body_over_the_limit(guarded: httpx.AsyncClient, settings: Settings,
                                   path: str) -> None:
    ops = [{"op": "like", "user_id": u, "item_type": "post", "item_id": "i" * 60}
           for u in range(20_000)]
    big = {"ops": ops} if path == "/v1/bulk" else {**GOOD, "region": "r" * settings.max_body_bytes}
    err = check_error(await guarded.post(path, json=big), 413, "body")
    assert err["code"] == "body_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no content-length: chunked transfer
        yield b'{"user_id": 1, "item_type": "post", "item_id": 7, "region": "'
        for _ in range(settings.max_body_bytes // 65_536 + 1):
            yield b"r" * 65_536
        yield b'"}'

    r = await guarded.post(path, content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    check_error(r, 413, "body")


async def test_unknown_path_and_method(guarded: httpx.AsyncClient) -> None:
    err = check_error(await guarded.get("/v1/nope"), 404, "path")
    assert err["code"] == "not_found"
    err = check_error(await guarded.get("/v1/like"), 405, "method")
    assert err["code"] == "method_not_allowed"
    check_error(await guarded.delete("/v1/counts"), 405, "method")


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000,
                                 b'{"user_id":' * 50_000 + b"1" + b"}" * 50_000],
                         ids=["arrays", "objects"])
async def test_json_nested_too_deep(guarded: httpx.AsyncClient, raw: bytes) -> None:
    r = await guarded.post("/v1/like", content=raw, headers={"content-type": "application/json"})
    assert check_error(r, 400, "body")["code"] == "bad_json"


@pytest.mark.parametrize("raw", [b'{"user_id": 1e400, "item_type": "post", "item_id": 1}',
                                 b'{"user_id": NaN, "item_type": "post", "item_id": 1}',
                                 b'{"user_id": "\\ud800", "item_type": "post", "item_id": 1}'])
async def test_odd_json_values(guarded: httpx.AsyncClient, raw: bytes) -> None:
    r = await guarded.post("/v1/like", content=raw, headers={"content-type": "application/json"})
    check_error(r, 422, "user_id")
