"""The holding streams of synchronous replication against a real nats-server (one server, no
domain: what crosses a leaf link between regions is tested in tests/regions/test_regions_sync.py).

Here a region's own server holding its own states must not count as a peer's acknowledgement,
a fence must refuse them, and an API must start (and refuse synchronous writes) while its NATS
is down, then connect once it is up."""

from __future__ import annotations

import anyio
import pytest

from tally.core.errors import Unavailable
from tally.store.jetstream.synchold import JetStreamHold, holding_stream
from tally.store.ports import HeldState
from tally_dev.engines import NatsEngine
from tests.engines import EngineFactory

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

STATE = HeldState("like", "u1", "post:1", True, 1.0)


async def test_a_holding_stream_in_the_home_domain_is_no_acknowledgement(nats_url: str) -> None:
    holder = JetStreamHold(nats_url, "T_SYNC", "eu", ["us"], 60.0)  # keeps us's holding stream
    home = JetStreamHold(nats_url, "T_SYNC", "us", ["eu"], 60.0)
    await holder.start()
    await home.start()
    try:
        # The stream stores it, but in the same (empty) domain as the publisher: refused.
        with pytest.raises(Unavailable, match="not by a peer region") as refused:
            await home.hold([STATE])
        assert refused.value.status == 503 and dict(refused.value.headers)[b"retry-after"] == b"1"
        assert await holder.held("us") == [STATE]
        await holder.fence("us", True)  # a failover: nothing listens for us's states any more
        with pytest.raises(Unavailable, match="no peer region acknowledged"):
            await home.hold([STATE])
        assert await holder.held("us") == [STATE]  # what it held stays for the failover
        await holder.fence("us", False)  # the rejoin: purged, listening again
        assert await holder.held("us") == []
        with pytest.raises(Unavailable, match="not by a peer region"):
            await home.hold([STATE])
        assert await holder.held("us") == [STATE]
    finally:
        await home.close()
        await holder.close()


async def test_an_api_starts_with_nats_down_and_connects_when_it_is_up(
        engine_factory: EngineFactory) -> None:
    server = engine_factory(NatsEngine)
    hold = JetStreamHold(server.url, "T_SYNC_LATE", "us", ["eu"], 60.0,
                         connect_in_background=True)
    await hold.start()  # returns at once: nothing listens yet
    try:
        with pytest.raises(Unavailable, match="not connected"):
            await hold.hold([STATE])
        server.start()
        with anyio.fail_after(30):
            while hold._nc is None:
                await anyio.sleep(0.1)
        info = await hold.nc.jetstream().stream_info(holding_stream("T_SYNC_LATE", "eu"))
        assert info.config.subjects == ["t_sync_late_sync.eu"]
    finally:
        await hold.close()
