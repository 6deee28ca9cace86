"""How a home region's refusal of a forwarded write is answered in the region that forwarded it."""

from __future__ import annotations

import httpx
import pytest

from tally.core.errors import InvalidInput, RateLimited, Unavailable
from tally.store.peers.forward import _refusal


def answer(status: int, message: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": "x", "message": message}},
                          headers=headers or {})


def test_a_rate_limit_passes_through_with_its_wait() -> None:
    err = _refusal("eu", answer(429, "user 7 is over its rate", {"retry-after": "3"}))
    assert isinstance(err, RateLimited) and err.status == 429
    assert (b"retry-after", b"3") in err.headers and "over its rate" in err.message


@pytest.mark.parametrize("status", [401, 403, 500, 503])
def test_a_refused_region_key_or_a_failing_region_is_unavailable(status: int) -> None:
    err = _refusal("eu", answer(status, "no such key"))
    assert isinstance(err, Unavailable) and err.status == 503 and "eu" in err.message


def test_what_the_client_sent_wrong_stays_invalid() -> None:
    err = _refusal("eu", answer(422, "item_type 'pin' is not configured"))
    assert isinstance(err, InvalidInput) and err.status == 422 and "'pin'" in err.message
    assert "not json" in _refusal("eu", httpx.Response(400, text="not json")).message
