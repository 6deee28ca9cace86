"""Fair use: token buckets per API key and per user, answered with 429 and Retry-After.

The embedded server keeps its buckets in memory. A cluster's API processes share theirs through
Redis (``SharedBuckets``, implemented by ``tally.store.rediscache.buckets``: a request's takes in
one Lua script call) so a user cannot multiply the limit by the number of processes; when Redis
does not answer, each process falls back to its own buckets (a limit per process rather than
none) and says so in the log and in a metric.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter

from tally.api.auth import Principal
from tally.core.bucket import Buckets, Rate
from tally.core.errors import RateLimited

log = logging.getLogger("tally.limits")

# After a failed shared take, the local buckets serve alone this long before Redis is tried again,
# so an outage costs one timeout per interval, not one per request.
SHARED_RETRY_S = 5.0


class SharedBuckets(Protocol):
    async def take_all(self, names: Sequence[str], rate: Rate, cost: float
                       ) -> tuple[str, float] | None:
        """``Buckets.take_all`` on buckets every API process shares."""


class Limiter:
    def __init__(self, per_key: Rate, per_user: Rate, registry: CollectorRegistry,
                 shared: SharedBuckets | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_key, self.per_user = per_key, per_user
        self.keys, self.users = Buckets(per_key), Buckets(per_user)
        self.shared = shared
        self.clock = clock
        self._shared_down_until = 0.0
        self._limited = Counter("tally_rate_limited", "Requests refused with 429, by limit and "
                                "API key", ["limit", "key"], registry=registry)
        self._by_key = Counter("tally_api_key_requests", "Requests by API key name (admin, "
                               "loopback or a key's name)", ["key"], registry=registry)
        self._fallback = Counter("tally_rate_limit_local_fallback", "Takes served by the "
                                 "process's own buckets because the shared ones (Redis) failed",
                                 registry=registry)
        self._key_children: dict[str, Any] = {}

    def _count(self, name: str) -> None:
        """The labelled child is kept, not looked up (and locked) again per request."""
        child = self._key_children.get(name)
        if child is None:
            child = self._key_children[name] = self._by_key.labels(name)
        child.inc()

    def announce(self) -> None:
        if self.per_key.on or self.per_user.on:
            log.info("rate limits (per key %g/s, per user %g/s; 0 is off) kept %s",
                     self.per_key.rate, self.per_user.rate,
                     "in Redis, shared by the API processes" if self.shared is not None
                     else "in this process's memory")

    async def check_key(self, who: Principal) -> None:
        """Counts the request under its key, then takes from the key's bucket (admin is exempt)."""
        self._count(who.name)
        if who.admin or not self.per_key.on:
            return
        if (refused := await self._take_all(["key:" + who.name], self.keys)) is not None:
            self._limited.labels("key", who.name).inc()
            raise RateLimited(f"API key {who.name!r} is over {self.per_key.rate:g} requests a "
                              "second", "authorization", refused[1])

    async def check_users(self, who: Principal, users: Sequence[str]) -> None:
        """One token from the bucket of each distinct user named in the request, all or none: a
        bulk request names up to max_bulk_ops users, and their takes go together (one script
        call when the buckets are shared, where a call per user cost a round trip each)."""
        if who.admin or not self.per_user.on:
            return
        names = (["user:" + users[0]] if len(users) == 1  # a like: one user
                 else ["user:" + user for user in dict.fromkeys(users)])
        if (refused := await self._take_all(names, self.users)) is not None:
            self._limited.labels("user", who.name).inc()
            raise RateLimited(f"user {refused[0].removeprefix('user:')} is over "
                              f"{self.per_user.rate:g} requests a second", "user_id", refused[1])

    async def _take_all(self, names: Sequence[str], local: Buckets) -> tuple[str, float] | None:
        now = self.clock()
        if self.shared is not None and now >= self._shared_down_until:
            try:
                return await self.shared.take_all(names, local.rate, 1.0)
            except Exception as exc:  # any failure of Redis: fall back, never fail the request
                self._shared_down_until = now + SHARED_RETRY_S
                log.warning("shared rate limits unavailable (%s): each process limits on its "
                            "own for the next %.0f s", exc, SHARED_RETRY_S)
        if self.shared is not None:
            self._fallback.inc(len(names))
        return local.take_all(names, now)
