"""Writes forwarded to another region's API (``RemoteWriter``), over HTTP/1.1 keep-alive.

A forwarded request is an ordinary ``POST /v1/bulk`` at the home region: it is decided there
like any local write and answered with each op's state and count. Transport failures and 5xx
answers become ``Unavailable`` (the client retries: toggles are idempotent); a 4xx would mean the
regions disagree about the schema, a configuration error, and is raised as it came.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import orjson

from tally.core.errors import InvalidInput, RateLimited, TallyError, Unavailable
from tally.core.model import IncrOp, Op, OpResult, split_item


def _body(op: Op) -> dict[str, Any]:
    item_type, item_id = split_item(op.item)
    out: dict[str, Any] = {"counter": op.counter, "item_type": item_type, "item_id": item_id,
                           "region": op.region}
    if isinstance(op, IncrOp):
        out.update(op="incr", n=op.n, idempotency_key=op.idempotency_key)
        if op.user is not None:
            out["user_id"] = op.user
    else:
        out.update(op="set" if op.on else "clear", user_id=op.user)
    return out


class HttpRemoteWriter:
    def __init__(self, urls: Mapping[str, str], key: str | None = None,
                 timeout_s: float = 5.0) -> None:
        """``key``: the API key shown to the peers (their keys file names it), if they ask one."""
        self.urls = dict(urls)
        headers = {"authorization": f"Bearer {key}"} if key else {}
        # A dead region's address drops packets: give up connecting after a second, so a client's
        # retry soon finds the placement that moved its user (a failover takes effect in 0.5 s).
        # A request sent into a cut link waits in the kernel's send queue, and TCP keeps
        # retransmitting it after this side gave up (503, the client retries elsewhere and moves
        # on); delivered when the link heals, the home region would decide the stale write over
        # the client's newer ones. TCP_USER_TIMEOUT makes the kernel drop unacknowledged data
        # after the request's own timeout, so a forwarded write arrives in time or never.
        options = ([(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(timeout_s * 1000))]
                   if hasattr(socket, "TCP_USER_TIMEOUT") else [])
        transport = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_keepalive_connections=32), socket_options=options)
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=1.0),
                                         headers=headers, transport=transport)

    async def write(self, region: str, ops: Sequence[Op]) -> list[OpResult]:
        url = self.urls.get(region)
        if url is None:
            raise Unavailable(f"no API address for region {region!r}")
        try:
            resp = await self._client.post(f"{url}/v1/bulk", content=orjson.dumps(
                {"ops": [_body(op) for op in ops]}), headers={"content-type": "application/json"})
        except httpx.HTTPError as exc:
            raise Unavailable(f"region {region} is unreachable: {exc!r}") from exc
        if resp.status_code == 200:
            return [OpResult(changed=r["changed"], count=r["count"], state=r.get("state"))
                    for r in resp.json()["results"]]
        raise _refusal(region, resp)

    async def close(self) -> None:
        await self._client.aclose()


def _refusal(region: str, resp: httpx.Response) -> TallyError:
    """The home region's refusal, as this region answers it. A rate limit is the user's and
    passes through with its wait; a refused credential is this deployment's misconfigured
    region key, not the client's fault (503); anything else the client sent is invalid there."""
    if resp.status_code == 429:
        retry_after = float(resp.headers.get("retry-after", "1") or 1)
        return RateLimited(f"region {region}: {_message(resp)}", None, retry_after)
    if resp.status_code >= 500 or resp.status_code in (401, 403):
        wait = resp.headers.get("retry-after")  # e.g. no peer of the home holds a sync write
        return Unavailable(f"region {region} answered {resp.status_code}: {_message(resp)}",
                           retry_after_s=float(wait) if wait and wait.isdigit() else None)
    return InvalidInput(f"region {region} refused a forwarded write: {_message(resp)}")


def _message(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return resp.text[:200]
