"""Typed Python clients for the HTTP API: ``AsyncTally`` and ``Tally`` (blocking).

Both share the request building and the response parsing below; only the transport differs.
Errors come back as ``TallyAPIError`` with the server's code, message and field.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import orjson

from tally.batching import BATCHER_IN_FLIGHT, BATCHER_MAX_OPS, Batcher
from tally.wire import FeedItem, Id, IncrResult, Item, TallyAPIError, ToggleResult, toggle_body

__all__ = ["AsyncTally", "FeedItem", "Id", "IncrResult", "Item", "Tally", "TallyAPIError",
           "ToggleResult"]

def _auth(token: str | None) -> dict[str, str]:
    return {} if token is None else {"authorization": f"Bearer {token}"}


def _items(items: Sequence[Item]) -> list[dict[str, Any]]:
    return [{"item_type": t, "item_id": i} for t, i in items]


def _check(resp: httpx.Response) -> Any:
    if resp.status_code >= 400:
        try:
            err = resp.json()["error"]
            raise TallyAPIError(resp.status_code, err["code"], err["message"], err.get("field"))
        except (ValueError, KeyError, TypeError):
            raise TallyAPIError(resp.status_code, "http", resp.text[:200], None) from None
    return orjson.loads(resp.content)


def _toggle_result(data: dict[str, Any]) -> ToggleResult:
    return ToggleResult(state=data["state"], changed=data["changed"], count=data["count"])


class _Requests:
    """(method, path, json) for each call; shared by both clients."""

    @staticmethod
    def toggle(counter: str, on: bool, user: Id, item_type: str, item_id: Id,
               region: str | None) -> tuple[str, str, Any]:
        if counter == "like":
            path = "/v1/like" if on else "/v1/unlike"
        else:
            path = f"/v1/counters/{counter}/{'set' if on else 'clear'}"
        return "POST", path, toggle_body(user, item_type, item_id, region)

    @staticmethod
    def incr(counter: str, item_type: str, item_id: Id, n: int, key: str | None,
             user: Id | None) -> tuple[str, str, Any]:
        body: dict[str, Any] = {"item_type": item_type, "item_id": item_id, "n": n}
        if key is not None:
            body["idempotency_key"] = key
        if user is not None:
            body["user_id"] = user
        return "POST", f"/v1/counters/{counter}/incr", body

    @staticmethod
    def counts(items: Sequence[Item], counters: Sequence[str] | None) -> tuple[str, str, Any]:
        return "POST", "/v1/counts", {"items": _items(items),
                                      "counters": list(counters) if counters else None}

    @staticmethod
    def feed(user: Id, items: Sequence[Item], counters: Sequence[str] | None) -> tuple[str, str, Any]:
        method, path, body = _Requests.counts(items, counters)
        return method, path, {**body, "user_id": user}

    @staticmethod
    def has(user: Id, items: Sequence[Item], counter: str) -> tuple[str, str, Any]:
        return "POST", "/v1/has", {"user_id": user, "counter": counter, "items": _items(items)}


def _parse_counts(data: dict[str, Any]) -> list[dict[str, int]]:
    return [r["counts"] for r in data["results"]]


def _parse_feed(data: dict[str, Any]) -> list[FeedItem]:
    return [FeedItem(r["counts"], r["has"]) for r in data["results"]]


def _parse_has(data: dict[str, Any]) -> list[bool]:
    return [r["on"] for r in data["results"]]


class AsyncTally:
    def __init__(self, base_url: str = "http://127.0.0.1:8080", timeout: float = 10.0,
                 max_connections: int = 100,
                 transport: httpx.AsyncBaseTransport | None = None,
                 token: str | None = None) -> None:
        """``token``: an API key, or the admin token for the admin routes (docs/security.md)."""
        limits = httpx.Limits(max_connections=max_connections,
                              max_keepalive_connections=max_connections)
        self.http = httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits,
                                      transport=transport, headers=_auth(token))

    def batcher(self, max_ops: int | None = None, window_ms: float = 2.0,
                max_in_flight: int | None = None) -> Batcher:
        """Gathers concurrent like/unlike/incr calls into /v1/bulk requests (see tally.batching;
        ``None`` takes its defaults)."""
        return Batcher(self, max_ops or BATCHER_MAX_OPS, window_ms / 1000,
                       max_in_flight or BATCHER_IN_FLIGHT)

    async def __aenter__(self) -> AsyncTally:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def _call(self, req: tuple[str, str, Any]) -> Any:
        method, path, body = req
        return _check(await self.http.request(method, path, json=body))

    async def like(self, user: Id, item_type: str, item_id: Id,
                   region: str | None = None) -> ToggleResult:
        return await self.set(user, item_type, item_id, "like", True, region)

    async def unlike(self, user: Id, item_type: str, item_id: Id,
                     region: str | None = None) -> ToggleResult:
        return await self.set(user, item_type, item_id, "like", False, region)

    async def set(self, user: Id, item_type: str, item_id: Id, counter: str = "like",
                  on: bool = True, region: str | None = None) -> ToggleResult:
        data = await self._call(_Requests.toggle(counter, on, user, item_type, item_id, region))
        return _toggle_result(data)

    async def incr(self, counter: str, item_type: str, item_id: Id, n: int = 1,
                   idempotency_key: str | None = None, user: Id | None = None) -> IncrResult:
        data = await self._call(_Requests.incr(counter, item_type, item_id, n, idempotency_key,
                                               user))
        return IncrResult(applied=data["applied"], count=data["count"])

    async def counts(self, items: Sequence[Item],
                     counters: Sequence[str] | None = None) -> list[dict[str, int]]:
        return _parse_counts(await self._call(_Requests.counts(items, counters)))

    async def count(self, item_type: str, item_id: Id, counter: str = "like") -> int:
        return (await self.counts([(item_type, item_id)], [counter]))[0][counter]

    async def has(self, user: Id, items: Sequence[Item], counter: str = "like") -> list[bool]:
        return _parse_has(await self._call(_Requests.has(user, items, counter)))

    async def feed(self, user: Id, items: Sequence[Item],
                   counters: Sequence[str] | None = None) -> list[FeedItem]:
        """Counts and the viewer's toggles in one request: what a feed page waits for."""
        return _parse_feed(await self._call(_Requests.feed(user, items, counters)))

    async def bulk(self, ops: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        data = await self._call(("POST", "/v1/bulk", {"ops": list(ops)}))
        results: list[dict[str, Any]] = data["results"]
        return results

    async def reconcile(self, items: Sequence[Item] | None = None,
                        repair: bool = False) -> list[dict[str, Any]]:
        body = {"items": None if items is None else _items(items), "repair": repair}
        lines = []
        async with self.http.stream("POST", "/v1/admin/reconcile", json=body,
                                    timeout=None) as resp:
            if resp.status_code >= 400:
                await resp.aread()
                _check(resp)
            async for line in resp.aiter_lines():
                if line.strip():
                    lines.append(orjson.loads(line))
        return lines


class Tally:
    """The blocking client, for scripts and the CLI."""

    def __init__(self, base_url: str = "http://127.0.0.1:8080", timeout: float = 10.0,
                 token: str | None = None) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=timeout, headers=_auth(token))

    def __enter__(self) -> Tally:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _call(self, req: tuple[str, str, Any]) -> Any:
        method, path, body = req
        return _check(self.http.request(method, path, json=body))

    def like(self, user: Id, item_type: str, item_id: Id, region: str | None = None
             ) -> ToggleResult:
        return self.set(user, item_type, item_id, "like", True, region)

    def unlike(self, user: Id, item_type: str, item_id: Id, region: str | None = None
               ) -> ToggleResult:
        return self.set(user, item_type, item_id, "like", False, region)

    def set(self, user: Id, item_type: str, item_id: Id, counter: str = "like", on: bool = True,
            region: str | None = None) -> ToggleResult:
        return _toggle_result(self._call(_Requests.toggle(counter, on, user, item_type, item_id,
                                                          region)))

    def incr(self, counter: str, item_type: str, item_id: Id, n: int = 1,
             idempotency_key: str | None = None, user: Id | None = None) -> IncrResult:
        data = self._call(_Requests.incr(counter, item_type, item_id, n, idempotency_key, user))
        return IncrResult(applied=data["applied"], count=data["count"])

    def counts(self, items: Sequence[Item],
               counters: Sequence[str] | None = None) -> list[dict[str, int]]:
        return _parse_counts(self._call(_Requests.counts(items, counters)))

    def has(self, user: Id, items: Sequence[Item], counter: str = "like") -> list[bool]:
        return _parse_has(self._call(_Requests.has(user, items, counter)))

    def feed(self, user: Id, items: Sequence[Item],
             counters: Sequence[str] | None = None) -> list[FeedItem]:
        """Counts and the viewer's toggles in one request: what a feed page waits for."""
        return _parse_feed(self._call(_Requests.feed(user, items, counters)))

    def bulk(self, ops: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = self._call(("POST", "/v1/bulk", {"ops": list(ops)}))[
            "results"]
        return results

    def reconcile_stream(self, items: Sequence[Item] | None = None,
                         repair: bool = False) -> Iterator[dict[str, Any]]:
        """Yields the server's progress lines as they arrive."""
        body = {"items": None if items is None else _items(items), "repair": repair}
        with self.http.stream("POST", "/v1/admin/reconcile", json=body, timeout=None) as resp:
            if resp.status_code >= 400:
                resp.read()
                _check(resp)
            for line in resp.iter_lines():
                if line.strip():
                    yield orjson.loads(line)

    def get(self, path: str) -> Any:
        return _check(self.http.get(path))
