"""The harness's parts: workloads are deterministic, HTTP framing is parsed, histograms merge."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from tally.bench.hist import Recorder
from tally.bench.http1 import Http1Connection
from tally.bench.workloads import PRESETS, Generator, Params, Zipf


def _bodies(preset: str, seed: int, n: int = 50) -> list[bytes]:
    gen = Generator(preset, Params(items=1000), seed, worker=0)
    return [b"".join(gen.next()[1]) for _ in range(n)]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_are_seeded(preset: str) -> None:
    assert _bodies(preset, 3) == _bodies(preset, 3)
    assert _bodies(preset, 3) != _bodies(preset, 4)


def test_viral_share_and_zipf_range() -> None:
    gen = Generator("viral", Params(items=1000, viral_share=0.4), seed=1, worker=0)
    items = [orjson.loads(gen.next()[1][0].split(b"\r\n\r\n", 1)[1])["item_id"] for _ in range(4000)]
    assert 0.35 < items.count(1) / len(items) < 0.45
    import random

    z = Zipf(10_000, 1.0, random.Random(1))
    draws = [z.draw() for _ in range(20_000)]
    assert min(draws) >= 1 and max(draws) <= 10_000
    assert draws.count(1) > draws.count(100) * 10  # popularity falls as 1/k


def test_recorder_round_trip_and_merge() -> None:
    a, b = Recorder(), Recorder()
    a.ok("like", 0, 0.002)
    b.ok("like", 1, 0.004)
    b.error("http 503", 1)
    merged = Recorder.decode(a.encode())
    merged.merge(Recorder.decode(b.encode()))
    assert merged.completed() == 2
    assert merged.errors == {"http 503": 1}
    assert sorted(merged.seconds) == [0, 1]


class _Feed(Http1Connection):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []


@pytest.mark.anyio
@pytest.mark.parametrize("chunks", [
    [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"],
    [b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n", b"\r\nhel", b"lo"],
    [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n", b"0\r\n\r\n"],
])
async def test_http1_framing(chunks: list[bytes]) -> None:
    conn = _Feed()

    class _Transport:
        def write(self, data: bytes) -> None:
            conn.sent.append(data)

    conn.transport = _Transport()  # type: ignore[assignment]
    task = asyncio.ensure_future(conn.request(b"GET / HTTP/1.1\r\n\r\n"))
    await asyncio.sleep(0)
    for c in chunks:
        conn.data_received(c)
    status = await task
    assert status in (200, 201)
    assert not conn._buf  # the whole response was consumed


def test_runs_like_with_fresh_users() -> None:
    """A second run against the same server must send new likes, not replay the first run's."""
    def users(run_id: int) -> set[int]:
        gen = Generator("uniform", Params(items=1000), seed=1, worker=0, run_id=run_id)
        return {orjson.loads(gen.next()[1][0].split(b"\r\n\r\n", 1)[1])["user_id"] for _ in range(100)}

    assert not users(1) & users(2)
    assert len(users(1)) == 100
