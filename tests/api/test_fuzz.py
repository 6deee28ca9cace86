"""Random JSON at every write and read endpoint: never a 500, errors well formed, 4xx writes nothing.

For toggles, an answer of 200 must also agree with an independent statement of the id rules.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio.from_thread
import httpx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tally.api.app import create_app
from tally.settings import Settings
from tests.helpers import snapshot

json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=6)
id_like = st.one_of(st.integers(-(2**64), 2**64), st.from_regex(r"[A-Za-z0-9_.:\-]{0,66}",
                                                                   fullmatch=True),
                    st.text(max_size=66), json_value)
item_type = st.sampled_from(["post", "reel", "video", ""]) | json_value
toggle_body = st.fixed_dictionaries({}, optional={"user_id": id_like, "item_type": item_type,
                                                  "item_id": id_like, "region": json_value})
incr_body = st.fixed_dictionaries({}, optional={
    "item_type": item_type, "item_id": id_like, "n": st.integers(-2, 2**64) | json_value,
    "idempotency_key": st.text(max_size=130) | json_value, "user_id": id_like})
item_ref = st.fixed_dictionaries({}, optional={"item_type": item_type, "item_id": id_like})
bulk_op = st.fixed_dictionaries({}, optional={
    "op": st.sampled_from(["like", "unlike", "set", "clear", "incr", "nope"]) | json_value,
    "counter": st.sampled_from(["like", "save", "view", "nope"]) | json_value,
    "user_id": id_like, "item_type": item_type, "item_id": id_like, "n": json_value})
requests = st.one_of(
    st.tuples(st.sampled_from(["/v1/like", "/v1/unlike", "/v1/counters/save/set",
                               "/v1/counters/nope/clear"]), toggle_body),
    st.tuples(st.sampled_from(["/v1/counters/view/incr", "/v1/counters/like/incr"]), incr_body),
    st.tuples(st.just("/v1/bulk"), st.fixed_dictionaries({"ops": st.lists(bulk_op, max_size=4)})),
    st.tuples(st.just("/v1/counts"), st.fixed_dictionaries(
        {"items": st.lists(item_ref, max_size=3)}, optional={"counters": json_value,
                                                             "user_id": id_like})),
    st.tuples(st.just("/v1/has"), st.fixed_dictionaries(
        {"items": st.lists(item_ref, max_size=3)}, optional={"user_id": id_like,
                                                             "counter": json_value})),
    st.tuples(st.sampled_from(["/v1/like", "/v1/bulk", "/v1/counts"]), json_value),
)

_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")


def valid_id(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, float) and v.is_integer():  # 7.0 is the integer 7, as in JSON Schema
        v = int(v)
    if isinstance(v, int):
        return -(2**63) <= v < 2**63
    return isinstance(v, str) and _ID.fullmatch(v) is not None


class AppClient:
    """The in-process app on an event loop in a helper thread, called from sync test code."""

    def __init__(self, portal: anyio.from_thread.BlockingPortal, client: httpx.AsyncClient,
                 db: Path) -> None:
        self.portal, self.client, self.db = portal, client, db

    def post(self, path: str, body: Any) -> httpx.Response:
        return self.portal.call(lambda: self.client.post(path, json=body))

    def get(self, path: str, counters: list[str]) -> httpx.Response:
        params = httpx.QueryParams([("counter", c) for c in counters])
        return self.portal.call(lambda: self.client.get(path, params=params))


@pytest.fixture(scope="module")
def app_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppClient]:
    s = Settings(data_dir=str(tmp_path_factory.mktemp("fuzz")), aggregate_window_ms=5.0)
    app = create_app(s)
    with ExitStack() as stack:
        portal = stack.enter_context(anyio.from_thread.start_blocking_portal())
        stack.enter_context(portal.wrap_async_context_manager(app.lifespan()))
        # No background aggregation: the tables then change only by the requests themselves.
        aggregator = app.state.runtime.aggregator
        portal.call(aggregator.stop)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
        stack.enter_context(portal.wrap_async_context_manager(client))
        yield AppClient(portal, client, s.sqlite_path)


@settings(max_examples=100)
@given(req=requests)
@example(req=("/v1/bulk", {"ops": [{"op": []}]}))  # an unhashable op name once raised a 500
def test_never_a_500(app_client: AppClient, req: tuple[str, Any]) -> None:
    db = app_client.db
    path, body = req
    before = snapshot(db)
    r = app_client.post(path, body)
    assert r.status_code < 500, (path, body, r.text)
    if r.status_code >= 400:
        assert r.status_code in (400, 413, 422), r.text
        err = r.json()["error"]
        assert set(err) == {"code", "message", "field"}, err
        assert snapshot(db) == before, (path, body)
    elif path in ("/v1/like", "/v1/unlike", "/v1/counters/save/set"):
        assert isinstance(body, dict)
        assert valid_id(body["user_id"]) and valid_id(body["item_id"]), body
        assert body["item_type"] in ("post", "reel"), body
        assert body.get("region") is None or (isinstance(body["region"], str)
                                              and 1 <= len(body["region"]) <= 32), body


segment = st.sampled_from(["like", "view", "post", "day", "region", "1", "nope"]) | st.text(
    min_size=1, max_size=70)
get_paths = st.one_of(
    st.builds("/v1/items/{}/{}/counts".format, segment, segment),
    st.builds("/v1/has/{}/{}/{}/{}".format, segment, segment, segment, segment),
    st.builds("/v1/rollups/{}/{}/{}".format, segment, segment, segment),
)


@settings(max_examples=100)
@given(path=get_paths, counters=st.lists(segment, max_size=3))
@example(path="/v1/rollups/like/like/0/", counters=[])  # a trailing slash once drew a 307 redirect
def test_reads_never_a_500(app_client: AppClient, path: str, counters: list[str]) -> None:
    parts = path.split("/")
    url = "/".join(quote(p, safe="") for p in parts)
    r = app_client.get(url, counters)
    assert r.status_code in (200, 404, 422), (url, r.text)
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"code", "message", "field"}, r.text
