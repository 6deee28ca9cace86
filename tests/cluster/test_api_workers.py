"""`tally cluster up --api-workers N`: an API of several processes on its one port."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tally_dev.bench import cpu
from tally_dev.cluster import DevCluster, Layout
from tests.engines import require

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_an_api_of_two_processes_serves_likes_and_counts_on_one_port(engines_dir: Path) -> None:
    for engine in ("postgres", "redis", "nats"):
        require(engine)
    layout = Layout(apis=1, api_workers=2, relays=1, aggregators=1, partitions=2, databases=1)
    dev = DevCluster(engines_dir / "workers-cluster", layout,
                     settings={"aggregate_window_ms": 20.0, "log_level": "WARNING"})
    dev.up()
    try:
        url = dev.urls("api")[0]
        port = urlsplit(url).port or 80
        api = next(row["pid"] for row in dev.status() if row["name"] == "api-0")
        assert len(set(cpu.listening(port)) & set(cpu.children(api))) == 2
        with httpx.Client(base_url=url, timeout=10.0) as http:
            for user in range(20):  # new connections: the kernel spreads them over both
                with httpx.Client(base_url=url, timeout=10.0) as one:
                    r = one.post("/v1/like", json={"user_id": user, "item_type": "post",
                                                   "item_id": 7})
                    assert r.status_code == 200 and r.json()["changed"]
            deadline = time.monotonic() + 20
            while True:
                r = http.post("/v1/counts", json={"items": [{"item_type": "post", "item_id": 7}],
                                                  "counters": ["like"]})
                if r.json()["results"][0]["counts"]["like"] == 20:
                    break
                assert time.monotonic() < deadline, r.json()
                time.sleep(0.1)
    finally:
        dev.down()
