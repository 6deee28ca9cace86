"""The regions' witness quorum on etcd (``Witness``): leases for liveness, one key for the
placement, compare-and-swap by revision for deciding a failover exactly once.

Spoken over etcd's gRPC-JSON gateway (``/v3/...``, part of etcd itself since 3.3; Patroni talks
to etcd 3 the same way), so no gRPC stack is needed. Keys, under ``/tally/regions/``:

- ``alive/<region>/<process>``: attached to the process's lease; etcd deletes it when the lease
  expires, which is how the others learn the region went silent;
- ``members/<region>``: written once, never leased: a region that never started is not "dead";
- ``placement``: the placement map in force (JSON); replaced only by a transaction that
  compares its mod revision, so of two survivors deciding at once exactly one wins.

Every request is linearizable (etcd's default), i.e. needs the quorum: a member cut off from the
majority answers nothing, and the caller treats that as "lease not renewed".
"""

from __future__ import annotations

import base64
import contextlib
import uuid
from collections.abc import Sequence
from typing import Any

import httpx
import orjson

from tally.core.errors import Unavailable
from tally.core.regions import Placement

PREFIX = "/tally/regions/"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def _prefix_end(prefix: str) -> str:
    """etcd's range end for "every key starting with prefix" (the last byte plus one)."""
    raw = prefix.encode()
    return base64.b64encode(raw[:-1] + bytes([raw[-1] + 1])).decode()


class EtcdWitness:
    def __init__(self, urls: Sequence[str], region: str, ttl_s: float,
                 timeout_s: float = 2.0) -> None:
        """``urls``: client URLs of the etcd members, this region's first (tried in order)."""
        if not urls:
            raise ValueError("a witness needs at least one etcd URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.region = region
        self.ttl_s = ttl_s
        self.process = uuid.uuid4().hex[:12]
        self.lease: str | None = None
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=1.0))

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        lease, self.lease = self.lease, None
        if lease is not None:  # leaving cleanly: the others need not wait for the TTL
            with contextlib.suppress(Unavailable):
                await self._call("/v3/lease/revoke", {"ID": lease})
        await self._client.aclose()

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to the first member that answers; etcd forwards to its leader itself."""
        failures = []
        for url in self.urls:
            try:
                resp = await self._client.post(url + path, content=orjson.dumps(body))
            except httpx.HTTPError as exc:
                failures.append(f"{url}: {exc!r}")
                continue
            if resp.status_code == 200:
                out: dict[str, Any] = resp.json()
                return out
            failures.append(f"{url}: {resp.status_code} {resp.text[:200]}")
        raise Unavailable(f"witness quorum unreachable: {'; '.join(failures)}")

    async def keepalive(self) -> float:
        if self.lease is not None:
            got = await self._call("/v3/lease/keepalive", {"ID": self.lease})
            ttl = int(got.get("result", {}).get("TTL", 0))
            if ttl > 0:
                return float(ttl)
            self.lease = None  # expired: the others may have failed this region over
        granted = await self._call("/v3/lease/grant", {"TTL": max(int(self.ttl_s), 2)})
        lease = str(granted["ID"])
        # Both keys in one transaction: between a members key and a later alive key, a starting
        # region would look like a member that died, and a peer would fail it over.
        await self._call("/v3/kv/txn", {"success": [
            {"request_put": {"key": _b64(f"{PREFIX}alive/{self.region}/{self.process}"),
                             "value": _b64("1"), "lease": lease}},
            {"request_put": {"key": _b64(f"{PREFIX}members/{self.region}"),
                             "value": _b64("1")}}]})
        self.lease = lease
        return float(granted["TTL"])

    async def _regions_under(self, folder: str) -> set[str]:
        prefix = f"{PREFIX}{folder}/"
        got = await self._call("/v3/kv/range", {"key": _b64(prefix),
                                                "range_end": _prefix_end(prefix),
                                                "keys_only": True})
        return {_unb64(kv["key"])[len(prefix):].split("/", 1)[0] for kv in got.get("kvs", [])}

    async def alive(self) -> set[str]:
        return await self._regions_under("alive")

    async def members(self) -> set[str]:
        return await self._regions_under("members")

    async def placement(self) -> tuple[Placement | None, int]:
        got = await self._call("/v3/kv/range", {"key": _b64(f"{PREFIX}placement")})
        kvs = got.get("kvs", [])
        if not kvs:
            return None, 0
        body = orjson.loads(base64.b64decode(kvs[0]["value"]))
        return Placement.from_json(body), int(kvs[0]["mod_revision"])

    async def swap_placement(self, placement: Placement, revision: int) -> bool:
        key = _b64(f"{PREFIX}placement")
        compare = ({"key": key, "target": "MOD", "mod_revision": str(revision)} if revision else
                   {"key": key, "target": "CREATE", "create_revision": "0"})
        got = await self._call("/v3/kv/txn", {
            "compare": [compare],
            "success": [{"request_put": {"key": key, "value": base64.b64encode(
                orjson.dumps(placement.to_json())).decode()}}]})
        return bool(got.get("succeeded", False))
