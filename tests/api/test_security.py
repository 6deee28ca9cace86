"""The trust model (issue 16): admin token, API keys and their scope, the loopback rule, and the
refusals' shape (401/403 in the documented error body, Allow on 405, one rule for a BOM)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from tally.api.app import create_app
from tally.bootstrap import build
from tally.settings import Settings
from tests.helpers import db_exec, stored

pytestmark = pytest.mark.anyio

ADMIN = "admin-token-0123456789"
APP_KEY = "app-key-0123456789abcdef"
VIEWS_KEY = "views-key-0123456789abcdef"
LIKE = {"user_id": 1, "item_type": "post", "item_id": 7}
KEYS = f"""
[[key]]
name = "web"
key = "{APP_KEY}"

[[key]]
name = "views-only"
key = "{VIEWS_KEY}"
counters = ["view"]
"""


@asynccontextmanager
async def serve(settings: Settings, client: tuple[str, int] = ("127.0.0.1", 5000),
                token: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """The app in this process, seen from ``client``'s address, with the admin token (if any) in
    the environment as an operator would set it."""
    mp = pytest.MonkeyPatch()
    if token is not None:
        mp.setenv("TALLY_ADMIN_TOKEN", token)
    else:
        mp.delenv("TALLY_ADMIN_TOKEN", raising=False)
    try:
        app = create_app(settings, build(settings))
    finally:
        mp.undo()
    async with app.lifespan():
        transport = httpx.ASGITransport(app=app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://tally") as c:
            c.app = app  # type: ignore[attr-defined]
            yield c


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def keyed(settings: Settings, tmp_path: Path) -> Settings:
    path = tmp_path / "keys.toml"
    path.write_text(KEYS)
    return settings.replace(api_keys_file=str(path))


ADMIN_CALLS: list[tuple[str, str, dict[str, object] | None]] = [
    ("GET", "/v1/admin/hot", None), ("POST", "/v1/admin/reconcile", {}), ("GET", "/metrics", None)]


async def test_without_a_token_admin_routes_answer_loopback_only(settings: Settings) -> None:
    async with serve(settings) as c:
        for method, path, body in ADMIN_CALLS:
            assert (await c.request(method, path, json=body)).status_code == 200, path
    async with serve(settings, client=("203.0.113.9", 5000)) as c:
        for method, path, body in ADMIN_CALLS:
            r = await c.request(method, path, json=body)
            assert r.status_code == 403, path
            assert r.json()["error"]["code"] == "forbidden"
        assert (await c.get("/healthz")).status_code == 200  # public everywhere
        assert (await c.post("/v1/like", json=LIKE)).status_code == 403  # no keys file either


async def test_with_a_token_admin_routes_need_it(settings: Settings, tmp_path: Path) -> None:
    async with serve(keyed(settings, tmp_path), token=ADMIN) as c:
        for method, path, body in ADMIN_CALLS:
            r = await c.request(method, path, json=body)  # even from loopback
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"] == {"code": "unauthorized", "field": "authorization",
                                         "message": "this route needs Authorization: Bearer "
                                                    "<credential>"}
            wrong = await c.request(method, path, json=body, headers=bearer(ADMIN + "x"))
            assert wrong.status_code == 401
            as_key = await c.request(method, path, json=body, headers=bearer(APP_KEY))
            assert as_key.status_code == 403  # a client key is no admin credential
            ok = await c.request(method, path, json=body, headers=bearer(ADMIN))
            assert ok.status_code == 200, path
        r = await c.get("/v1/admin/hot", headers={"authorization": "Basic Zm9vOmJhcg=="})
        assert r.status_code == 401
        assert (await c.post("/v1/like", json=LIKE, headers=bearer(ADMIN))).status_code == 200


async def test_a_token_shorter_than_16_characters_is_refused(settings: Settings) -> None:
    from tally.core.errors import ConfigError

    with pytest.raises(ConfigError, match="at least 16"):
        async with serve(settings, token="short"):
            pass


async def test_reconcile_without_repair_never_writes(settings: Settings) -> None:
    async with serve(settings) as c:
        assert (await c.post("/v1/like", json=LIKE)).status_code == 200
        db = settings.sqlite_path
        await _applied(c)
        db_exec(db, "UPDATE counts SET count=9 WHERE item='post:7' AND counter='like'")
        for body in ({}, {"repair": False}, {"items": [{"item_type": "post", "item_id": 7}]}):
            r = await c.post("/v1/admin/reconcile", json=body)
            assert r.status_code == 200 and '"stored":9' in r.text
            assert stored(db)[("like", "post:7")] == 9
        r = await c.post("/v1/admin/reconcile", json={"repair": True})
        assert stored(db)[("like", "post:7")] == 1


async def _applied(c: httpx.AsyncClient) -> None:
    from tests.helpers import poll

    async def done() -> bool:
        return stored(Path(c.app.runtime.settings.sqlite_path)).get(  # type: ignore[attr-defined]
            ("like", "post:7")) == 1

    await poll(done)


async def test_api_keys_scope_and_revocation(settings: Settings, tmp_path: Path) -> None:
    s = keyed(settings, tmp_path)
    async with serve(s, client=("203.0.113.9", 5000)) as c:
        assert (await c.post("/v1/like", json=LIKE)).status_code == 401
        assert (await c.post("/v1/like", json=LIKE, headers=bearer("nope" * 5))).status_code == 401
        assert (await c.post("/v1/like", json=LIKE, headers=bearer(APP_KEY))).status_code == 200
        r = await c.post("/v1/like", json=LIKE, headers=bearer(VIEWS_KEY))
        assert r.status_code == 403 and r.json()["error"]["field"] == "counter"
        bulk = {"ops": [{"op": "incr", "counter": "view", "item_type": "post", "item_id": 1},
                        {"op": "like", "user_id": 1, "item_type": "post", "item_id": 1}]}
        r = await c.post("/v1/bulk", json=bulk, headers=bearer(VIEWS_KEY))
        assert r.status_code == 403  # all or nothing: one op out of scope refuses the batch
        r = await c.post("/v1/counters/view/incr", json={"item_type": "post", "item_id": 1},
                         headers=bearer(VIEWS_KEY))
        assert r.status_code == 200 and r.json()["count"] == 1
        r = await c.get("/v1/items/post/7/counts", headers=bearer(VIEWS_KEY))
        assert r.status_code == 200  # reads are not scoped
        # Revoke "web": the file is re-read when it changes (here at once, not after the poll).
        Path(s.api_keys_file).write_text(KEYS.split("[[key]]")[0] + "[[key]]" +
                                         KEYS.split("[[key]]")[2])
        assert c.app.keys.refresh()  # type: ignore[attr-defined]
        assert (await c.post("/v1/like", json=LIKE, headers=bearer(APP_KEY))).status_code == 401
        # A broken file leaves the keys in force.
        Path(s.api_keys_file).write_text("[[key]]\nname = 1\n")
        assert not c.app.keys.refresh()  # type: ignore[attr-defined]
        r = await c.post("/v1/counters/view/incr", json={"item_type": "post", "item_id": 1},
                         headers=bearer(VIEWS_KEY))
        assert r.status_code == 200


async def test_keys_are_named_in_metrics(settings: Settings, tmp_path: Path) -> None:
    async with serve(keyed(settings, tmp_path)) as c:
        await c.post("/v1/like", json=LIKE, headers=bearer(APP_KEY))
        await c.post("/v1/like", json=LIKE, headers=bearer(VIEWS_KEY))
        metrics = (await c.get("/metrics")).text
        assert 'tally_api_key_requests_total{key="web"} 1.0' in metrics
        assert 'tally_api_key_requests_total{key="views-only"} 1.0' in metrics


async def test_method_not_allowed_says_what_is(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/like")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = await client.delete("/v1/items/post/1/counts")
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    assert r.json()["error"]["code"] == "method_not_allowed"


POSTS = {"/v1/like": LIKE, "/v1/unlike": LIKE, "/v1/counters/save/set": LIKE,
         "/v1/counters/view/incr": {"item_type": "post", "item_id": 1},
         "/v1/bulk": {"ops": [{"op": "incr", "counter": "view", "item_type": "post", "item_id": 1}]},
         "/v1/counts": {"items": [{"item_type": "post", "item_id": 1}]},
         "/v1/has": {"user_id": 1, "items": [{"item_type": "post", "item_id": 1}]},
         "/v1/admin/reconcile": {}}


@pytest.mark.parametrize("path", sorted(POSTS))
async def test_a_bom_is_refused_on_every_route(client: httpx.AsyncClient, path: str) -> None:
    """RFC 8259 forbids sending a BOM; refused (400) the same way on every route."""
    import json

    body = json.dumps(POSTS[path]).encode()
    ok = await client.post(path, content=body, headers={"content-type": "application/json"})
    assert ok.status_code == 200, ok.text
    r = await client.post(path, content=b"\xef\xbb\xbf" + body,
                          headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_json"


async def test_an_integral_number_is_the_integer(client: httpx.AsyncClient) -> None:
    """JSON Schema's integer includes 7.0, so the API does too (the document says integer)."""
    r = await client.post("/v1/like", json={"user_id": 1.0, "item_type": "post", "item_id": 7e0})
    assert r.status_code == 200 and (r.json()["user_id"], r.json()["item_id"]) == ("1", "7")
    r = await client.post("/v1/like", json={"user_id": 1.5, "item_type": "post", "item_id": 7})
    assert r.status_code == 422
