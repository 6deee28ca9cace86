"""Health, readiness, Prometheus metrics and the OpenAPI document."""

from __future__ import annotations

import os
import re
import signal

import httpx
import orjson
import pytest

from tally.api.app import create_app
from tally.settings import Settings
from tally.store.sqlite import writer_process
from tests.helpers import app_client, child_with_failing_fsync, poll, runtime_of

pytestmark = pytest.mark.anyio


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    r = await client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "aggregator_lag_events": 0,
                        "aggregator_lag_seconds": 0.0}


async def test_not_ready_while_the_likes_writer_process_restarts(client: httpx.AsyncClient
                                                                  ) -> None:
    (proc,) = runtime_of(client).store.writer_processes
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    await poll(lambda: _status(client, 503), timeout_s=10, interval_s=0.005)
    r = await client.get("/readyz")  # unless the new child is already up
    assert r.status_code == 200 or "restarting" in r.json()["reason"]
    await poll(lambda: _status(client, 200), timeout_s=30)
    r = await client.post("/v1/like", json={"user_id": 1, "item_type": "post", "item_id": 1})
    assert r.status_code == 200 and r.json()["count"] == 1 and proc.restarts == 1


async def _status(client: httpx.AsyncClient, status: int) -> bool:
    return (await client.get("/readyz")).status_code == status


async def test_not_ready_when_the_store_is_down(client: httpx.AsyncClient) -> None:
    rt = runtime_of(client)
    await rt.aggregator.stop()
    await rt.store.close()
    r = await client.get("/readyz")
    assert r.status_code == 503 and r.json()["status"] == "unavailable"
    r = await client.post("/v1/like", json={"user_id": 1, "item_type": "post", "item_id": 1})
    assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
    await rt.store.start()  # so that the fixture's shutdown finds it running
    rt.aggregator.start()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample, found by name and a subset of its labels."""
    for line in text.splitlines():
        m = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    raise AssertionError(f"no sample {name} {labels}")


async def test_metrics(client: httpx.AsyncClient) -> None:
    for u in range(3):
        await client.post("/v1/like", json={"user_id": u, "item_type": "post", "item_id": 1})
    await client.post("/v1/like", json={"user_id": "bad id", "item_type": "post", "item_id": 1})
    await client.post("/v1/counts", json={"items": [{"item_type": "post", "item_id": 1}]})
    await client.post("/v1/counts", json={"items": [{"item_type": "post", "item_id": 1}]})
    await client.get("/v1/items/post/1/counts")
    rt = runtime_of(client)
    await rt.aggregator.drain()
    await rt.aggregator.refresh_lag()
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert sample(text, "tally_http_requests_total", endpoint="/v1/like", status="200") == 3
    assert sample(text, "tally_http_requests_total", endpoint="/v1/like", status="422") == 1
    assert sample(text, "tally_http_requests_total", endpoint="/v1/counts", method="POST") == 2
    assert sample(text, "tally_http_requests_total",
                  endpoint="/v1/items/{item_type}/{item_id}/counts") == 1
    assert sample(text, "tally_http_request_seconds_count", endpoint="/v1/like") == 4
    assert sample(text, "tally_http_request_seconds_bucket", endpoint="/v1/like", le="+Inf") == 4
    assert sample(text, "tally_aggregator_lag_events") == 0
    assert sample(text, "tally_aggregator_lag_seconds") == 0
    assert sample(text, "tally_aggregator_events_total") == 3
    ratio = sample(text, "tally_cache_hit_ratio")
    assert 0 < ratio < 1  # the first read missed, the later ones hit
    assert sample(text, "tally_write_commits_total") >= 1
    assert sample(text, "tally_write_syncs_total") >= 1  # FULL: answered after the WAL sync
    assert sample(text, "tally_write_stopped_by_sync_failure") == 0
    assert sample(text, "tally_hot_item_hits", item="post:1") >= 1
    assert sample(text, "tally_sqlite_checkpoint_failures_total") == 0
    assert sample(text, "tally_sqlite_wal_frames", file="likes") >= 0
    assert sample(text, "tally_sqlite_wal_frames", file="counts") >= 0
    for gen in "012":  # every generation is there from the start, collected or not yet
        assert sample(text, "tally_gc_pause_seconds_count", generation=gen) >= 0


async def test_lag_is_visible_before_aggregation(client: httpx.AsyncClient) -> None:
    rt = runtime_of(client)
    await rt.aggregator.stop()
    for u in range(4):
        await client.post("/v1/like", json={"user_id": u, "item_type": "post", "item_id": 1})
    await rt.aggregator.refresh_lag()
    text = (await client.get("/metrics")).text
    assert sample(text, "tally_aggregator_lag_events") == 4
    assert sample(text, "tally_aggregator_lag_seconds") >= 0
    assert (await client.get("/readyz")).json()["aggregator_lag_events"] == 4
    rt.aggregator.start()


async def test_openapi_and_docs(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    paths = set(spec["paths"])
    assert paths >= {"/v1/like", "/v1/unlike", "/v1/counters/{counter}/set",
                     "/v1/counters/{counter}/clear", "/v1/counters/{counter}/incr", "/v1/bulk",
                     "/v1/items/{item_type}/{item_id}/counts", "/v1/counts", "/v1/has",
                     "/v1/has/{counter}/{user_id}/{item_type}/{item_id}",
                     "/v1/rollups/{counter}/{item_type}/{dimension}", "/v1/admin/hot",
                     "/v1/admin/reconcile", "/healthz", "/readyz", "/metrics"}
    assert "/bench/noop" not in paths
    assert spec["info"]["title"] == "Tally"
    schemas = spec["components"]["schemas"]
    refs = re.findall(r'"\$ref": ?"([^"]+)"', orjson.dumps(spec).decode())
    assert refs and all(r.startswith("#/components/schemas/") for r in refs)  # no dangling $defs
    assert {r.rsplit("/", 1)[1] for r in refs} <= set(schemas)
    like = spec["paths"]["/v1/like"]["post"]
    assert like["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ToggleRequest")
    assert schemas["ToggleRequest"]["required"] == ["user_id", "item_type", "item_id"]
    assert schemas["ToggleRequest"]["additionalProperties"] is False
    bulk = spec["paths"]["/v1/bulk"]["post"]["requestBody"]["content"]["application/json"]
    assert bulk["schema"]["$ref"].endswith("/BulkRequest")
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert "https://" not in docs.text  # nothing from a CDN
    js = await client.get("/docs/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000
    # The configured vocabulary and limits are in the document (issue 16).
    incr = spec["paths"]["/v1/counters/{counter}/incr"]["post"]
    assert incr["parameters"][0]["schema"]["enum"] == ["view", "share"]
    assert set(incr["responses"]) == {"200", "400", "401", "403", "404", "408", "413", "422",
                                      "429", "503"}
    assert "Retry-After" in incr["responses"]["429"]["headers"]
    assert schemas["ToggleRequest"]["properties"]["item_type"]["enum"] == [
        "post", "reel", "comment", "story"]
    assert schemas["CountsRequest"]["properties"]["items"]["maxItems"] == 500
    assert schemas["BulkRequest"]["properties"]["ops"]["maxItems"] == 1000
    assert spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]["text/plain"]
    assert "application/x-ndjson" in spec["paths"]["/v1/admin/reconcile"]["post"]["responses"][
        "200"]["content"]


async def test_refused_bodies_are_counted_under_their_route(client: httpx.AsyncClient) -> None:
    """A 413 is sent before routing; its metrics still name the route, or "body_too_large"."""
    big = b"x" * (runtime_of(client).settings.max_body_bytes + 1)
    headers = {"content-type": "application/json"}
    assert (await client.post("/v1/like", content=big, headers=headers)).status_code == 413
    assert (await client.post("/v1/nope", content=big, headers=headers)).status_code == 413
    text = (await client.get("/metrics")).text
    assert sample(text, "tally_http_requests_total", endpoint="/v1/like", status="413") == 1
    assert sample(text, "tally_http_requests_total", endpoint="body_too_large", status="413") == 1
    assert 'endpoint="unmatched"' not in text


def test_tune_gc_freezes_start_up_objects_and_spaces_young_collections() -> None:
    import gc

    from tally.gctune import tune_gc

    before = gc.get_threshold()
    try:
        tune_gc(0)
        assert gc.get_threshold() == before
        tune_gc(12_345)
        assert gc.get_threshold() == (12_345, before[1], before[2])
        frozen = gc.get_freeze_count()
        assert frozen > 0
        later = [[n] for n in range(1000)]  # built after start-up, alive through a full collection
        gc.collect(1)
        assert gc.get_freeze_count() == frozen  # a partial collection freezes nothing
        gc.collect()
        assert gc.get_freeze_count() >= frozen + len(later)  # the first full one freezes survivors
        after_first = gc.get_freeze_count()
        gc.collect()
        assert gc.get_freeze_count() == after_first  # and only the first
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        from tally import gctune

        if gctune._freeze_after_first_full_collection in gc.callbacks:
            gc.callbacks.remove(gctune._freeze_after_first_full_collection)


async def test_loop_lag_is_measured_and_a_stall_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    import asyncio
    import time

    from tally.metrics import Metrics, watch_loop_lag

    m = Metrics()
    task = asyncio.create_task(watch_loop_lag(m, interval_s=0.005, warn_s=0.03,
                                              role="api-first"))
    try:
        await asyncio.sleep(0.02)
        time.sleep(0.06)  # the stall: nothing else runs on the loop meanwhile
        await asyncio.sleep(0.02)
    finally:
        task.cancel()
    await asyncio.sleep(0)  # the task handles its cancellation: the probe's timer goes with it
    text = m.render().decode()
    assert sample(text, "tally_event_loop_lag_seconds_count") >= 2
    await asyncio.sleep(0.03)
    assert m.render().decode() == text
    assert sample(text, "tally_event_loop_lag_seconds_bucket", le="0.05") < sample(
        text, "tally_event_loop_lag_seconds_bucket", le="+Inf")
    stalls = [r for r in caplog.records if r.getMessage() == "event loop stalled"]
    assert stalls and stalls[0].__dict__["stall_ms"] >= 30
    assert stalls[0].__dict__["role"] == "api-first"  # which of several processes stalled
    assert stalls[0].__dict__["pid"] == os.getpid()


async def test_an_embedded_app_leaves_the_host_collector_alone(settings: Settings) -> None:
    """Freezing is process-wide: only `tally serve` (owns_process) tunes it. An app run inside a
    test or another service froze the host's objects, and `gc.get_referrers` stopped seeing
    them (Hypothesis' register_random check then failed in CI)."""
    import gc

    from tally import gctune
    from tally.api import app as app_module

    before = (gc.get_threshold(), gc.get_freeze_count())
    async with app_client(app_module.create_app(settings)) as c:
        assert (await c.get("/healthz")).status_code == 200
        assert (gc.get_threshold(), gc.get_freeze_count()) == before
        assert gctune._freeze_after_first_full_collection not in gc.callbacks


async def test_a_failed_wal_sync_stops_writes_and_readiness(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The likes writer's WAL sync fails in its process: the write is refused (never
    acknowledged undurable), later writes too, and the server reports itself not ready."""
    monkeypatch.setattr(writer_process, "child_main", child_with_failing_fsync)
    async with app_client(create_app(settings)) as client:
        body = {"user_id": 1, "item_type": "post", "item_id": 1}
        r = await client.post("/v1/like", json=body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
        r = await client.post("/v1/like", json=body)
        assert r.status_code == 503 and "failed sync" in r.json()["error"]["message"]
        r = await client.get("/readyz")
        assert r.status_code == 503 and "fsync" in r.json()["reason"]
        text = (await client.get("/metrics")).text
        assert sample(text, "tally_write_stopped_by_sync_failure") == 1
