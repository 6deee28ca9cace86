"""``tally serve`` on SIGTERM: stops promptly, with every logged change applied to the counts."""

from __future__ import annotations

import signal

import httpx

from tests.conftest import ServerFactory
from tests.helpers import db_rows, recount, stored


def test_sigterm_drains_the_log_and_exits_cleanly(server_factory: ServerFactory) -> None:
    # A one-minute aggregation window: nothing is applied before the shutdown does it.
    server = server_factory(env={"TALLY_AGGREGATE_WINDOW_MS": "60000"})
    server.start()
    with httpx.Client(base_url=server.url, timeout=30) as c:
        ops = [{"op": "like", "user_id": u, "item_type": "post", "item_id": u % 3}
               for u in range(30)]
        assert c.post("/v1/bulk", json={"ops": ops}).status_code == 200
        r = c.post("/v1/like", json={"user_id": 99, "item_type": "post", "item_id": 0})
        assert r.json()["count"] == 11
    db = server.data_dir / "tally.db"
    assert stored(db) == {}
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal it caught: -SIGTERM, not 0.
    assert server.proc.wait(30) == -signal.SIGTERM
    assert stored(db) == recount(db) == {("like", "post:0"): 11, ("like", "post:1"): 10,
                                         ("like", "post:2"): 10}
    assert db_rows(db, "SELECT count(*) FROM changelog") == [(0,)]
