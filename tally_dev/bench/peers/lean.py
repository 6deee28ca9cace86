"""The lean server a capable engineer would hand-roll: a granian RSGI handler, orjson, no framework.

One handler dispatches on the path; bodies are parsed by orjson and checked by hand (the fields
present, ids an int or a string), and answers are built as dicts with the same shape as Tally's.
Behind it one of the peer stores (``peers.redis``, ``peers.pg``) or none at all: the ``bare``
kind answers every like and feed without storage, the ceiling of this server on this machine.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any, Protocol

import orjson

_JSON = [("content-type", "application/json")]


class PeerStore(Protocol):
    """A peer's storage: toggles of the one counter ``like`` and their counts."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def toggle(self, item: str, user: str, on: bool) -> tuple[bool, int]:
        """(changed, the item's count after this request)."""
        ...

    async def counts(self, items: Sequence[str]) -> list[int]: ...

    async def feed(self, user: str, items: Sequence[str]) -> list[tuple[int, bool]]:
        """(count, has the user liked it) per item, in one round trip to the engine."""
        ...


class NoStore:
    """The bare server: every like changes state and counts 1, every item has no likes."""

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def toggle(self, item: str, user: str, on: bool) -> tuple[bool, int]:
        return True, 1

    async def counts(self, items: Sequence[str]) -> list[int]:
        return [0] * len(items)

    async def feed(self, user: str, items: Sequence[str]) -> list[tuple[int, bool]]:
        return [(0, False)] * len(items)


class Invalid(Exception):
    pass


def _id(body: dict[str, Any], key: str) -> str:
    v = body.get(key)
    if type(v) is int or (type(v) is str and v):
        return str(v)
    raise Invalid(f"{key} must be an int or a string")


def _item(ref: Any) -> str:
    if type(ref) is not dict or type(ref.get("item_type")) is not str:
        raise Invalid("each item must be {item_type, item_id}")
    return f"{ref['item_type']}:{_id(ref, 'item_id')}"


class LeanApp:
    """The RSGI application; ``__rsgi_init__`` and ``__rsgi_del__`` open and close the store."""

    def __init__(self, store: PeerStore, max_items: int = 500) -> None:
        self.store = store
        self.max_items = max_items

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.run_until_complete(self.store.start())

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.run_until_complete(self.store.close())

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        path = scope.path
        try:
            if path == "/v1/like" or path == "/v1/unlike":
                out = await self.toggle(await proto(), path == "/v1/like")
            elif path == "/v1/counts":
                out = await self.counts(await proto())
            elif path == "/healthz":
                out = {"status": "ok"}
            else:
                proto.response_bytes(404, _JSON, b'{"error":{"code":"not_found"}}')
                return
        except (Invalid, orjson.JSONDecodeError) as exc:
            proto.response_bytes(422, _JSON, orjson.dumps({"error": {"code": "invalid",
                                                                      "message": str(exc)}}))
            return
        proto.response_bytes(200, _JSON, orjson.dumps(out))

    async def toggle(self, raw: bytes, on: bool) -> dict[str, Any]:
        body = orjson.loads(raw)
        if type(body) is not dict:
            raise Invalid("body must be an object")
        user = _id(body, "user_id")
        item = _item(body)
        changed, count = await self.store.toggle(item, user, on)
        item_type, _, item_id = item.partition(":")
        return {"counter": "like", "item_type": item_type, "item_id": item_id, "user_id": user,
                "state": on, "changed": changed, "count": count}

    async def counts(self, raw: bytes) -> dict[str, Any]:
        body = orjson.loads(raw)
        refs = body.get("items") if type(body) is dict else None
        if type(refs) is not list or len(refs) > self.max_items:
            raise Invalid(f"items must be a list of at most {self.max_items}")
        items = [_item(r) for r in refs]
        parts = [i.partition(":") for i in items]
        if body.get("user_id") is None:
            found = await self.store.counts(items)
            return {"results": [{"item_type": t, "item_id": i, "counts": {"like": n}}
                                for (t, _, i), n in zip(parts, found, strict=True)]}
        rows = await self.store.feed(_id(body, "user_id"), items)
        return {"results": [{"item_type": t, "item_id": i, "counts": {"like": n}, "has": {"like": h}}
                            for (t, _, i), (n, h) in zip(parts, rows, strict=True)]}


def app_from_env() -> LeanApp:
    """For granian's worker (``factory=True``): the store named by $PEER_KIND and $PEER_URL."""
    kind, url = os.environ["PEER_KIND"], os.environ.get("PEER_URL", "")
    pool = int(os.environ.get("PEER_POOL", "16"))
    store: PeerStore
    if kind == "pg":
        from tally_dev.bench.peers.pg import PostgresPeer

        store = PostgresPeer(url, pool)
    elif kind == "redis":
        from tally_dev.bench.peers.redis import RedisPeer

        store = RedisPeer(url, pool)
    elif kind == "bare":
        store = NoStore()
    else:
        raise ValueError(f"unknown peer kind {kind!r}")
    return LeanApp(store)
