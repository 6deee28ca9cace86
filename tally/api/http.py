"""A thin ASGI layer: route table, body limit, one decode pass, one error renderer, metrics.

Why not a framework: under a single like, FastAPI's per-request work (dependency resolution,
pydantic validation of a model and of the response, middleware stack) cost more than Tally's own
work. Here a request is routed by a dict lookup (or a split for the few templated paths), its body
read once with the size limit applied, decoded by msgspec straight into the route's struct, and
the answer encoded from a struct. Every error is a ``TallyError`` rendered in one place.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from prometheus_client import Counter, Histogram

from tally.api.auth import LOOPBACK, Guard, Principal
from tally.api.deadlines import Deadlines
from tally.api.limits import Limiter
from tally.core.errors import (
    BadJson,
    BodyTooLarge,
    InvalidInput,
    NotFound,
    RequestTimeout,
    TallyError,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

NOT_A_JSON_OBJECT = "request body must be a JSON object sent as Content-Type: application/json"
JSON = (b"content-type", b"application/json")
T = TypeVar("T")


class MethodNotAllowed(TallyError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, allowed: list[str]) -> None:
        super().__init__("Method Not Allowed", "method")
        self.headers = ((b"allow", ", ".join(sorted(set(allowed))).encode()),)


@dataclass(slots=True)
class Request:
    method: str
    path: str
    params: dict[str, str]
    body: bytes
    query: bytes
    content_type: str | None
    principal: Principal = LOOPBACK  # who sent it (tally.api.auth)
    limiter: Limiter | None = None

    async def users(self, *users: str) -> None:
        """Takes a token from each user's bucket (429 when one is empty)."""
        if self.limiter is not None:
            await self.limiter.check_users(self.principal, users)

    def query_list(self, name: str) -> list[str] | None:
        """Every value of a repeated query parameter (``?counter=a&counter=b``); None if absent."""
        if not self.query:
            return None
        from urllib.parse import parse_qsl

        found = [v for k, v in parse_qsl(self.query.decode("latin-1"), keep_blank_values=True)
                 if k == name]
        return found or None


@dataclass(slots=True)
class Response:
    body: bytes | AsyncIterator[bytes]
    status: int = 200
    media_type: bytes = b"application/json"


@dataclass(slots=True)
class Answer:
    """What the application answers, for the server to write: a whole body or a stream."""

    endpoint: str  # the route template, for the metrics
    status: int
    payload: bytes
    media: bytes
    extra: tuple[tuple[bytes, bytes], ...] = ()  # headers beside content-type and -length
    stream: AsyncIterator[bytes] | None = None


Handler = Callable[[Request], Awaitable[bytes | Response]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # "/v1/items/{item_type}/{item_id}/counts"
    handler: Handler
    summary: str = ""
    tags: tuple[str, ...] = ()
    body: type | None = None  # the request struct, for the OpenAPI document
    answer: type | None = None  # the response struct
    media_type: str = "application/json"
    query: tuple[tuple[str, Any], ...] = ()  # (name, JSON schema) of query parameters
    access: str = "client"  # public, client or admin (tally.api.auth)
    segments: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "segments", tuple(self.path.split("/")))

    def match(self, parts: Sequence[str]) -> dict[str, str] | None:
        if len(parts) != len(self.segments):
            return None
        params = {}
        for seg, part in zip(self.segments, parts, strict=True):
            if seg.startswith("{"):
                if not part:
                    return None
                params[seg[1:-1]] = part
            elif seg != part:
                return None
        return params


class Router:
    """Static paths by dict lookup; templated ones (few) by matching the split path."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = list(routes)
        self.static: dict[str, dict[str, Route]] = {}
        self.templated: list[Route] = []
        for r in routes:
            if "{" in r.path:
                self.templated.append(r)
            else:
                self.static.setdefault(r.path, {})[r.method] = r

    def find(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """The route and its path parameters; NotFound or MethodNotAllowed otherwise."""
        by_method = self.static.get(path)
        if by_method is not None:
            route = by_method.get(method)
            if route is None:
                raise MethodNotAllowed(list(by_method))
            return route, {}
        parts, allowed = path.split("/"), []
        for r in self.templated:
            params = r.match(parts)
            if params is not None:
                if r.method == method:
                    return r, params
                allowed.append(r.method)
        if allowed:
            raise MethodNotAllowed(allowed)
        raise NotFound("Not Found", "path")

    def endpoint_of(self, path: str) -> str:
        """The route template a path falls under (for a request refused before routing)."""
        if path in self.static:
            return path
        parts = path.split("/")
        return next((r.path for r in self.templated if r.match(parts) is not None), "body_too_large")


# -- decoding ---------------------------------------------------------------------------------------

_DECODERS: dict[type, msgspec.json.Decoder[Any]] = {}
_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_NAMED = re.compile(r"Object (?P<what>missing required|contains unknown) field `(?P<name>[^`]*)`")


def decode(kind: type[T], req: Request) -> T:
    """The body decoded into ``kind`` in one pass. Only a failure takes the slow path, which tells
    a body that is not JSON (400) from JSON of the wrong shape (422) as the API documents: msgspec
    stops at the first wrong field, and rejects NaN and lone surrogates the service judges."""
    ctype = req.content_type
    if ctype is not None and ctype != "application/json" and not _json_type(ctype):
        raise InvalidInput(NOT_A_JSON_OBJECT, "body")
    decoder = _DECODERS.get(kind)
    if decoder is None:
        decoder = _DECODERS[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(req.body)  # type: ignore[no-any-return]
    except (msgspec.ValidationError, msgspec.DecodeError):
        pass
    if not req.body.strip():
        raise InvalidInput(NOT_A_JSON_OBJECT, "body")
    try:
        parsed = json.loads(req.body.decode("utf-8"))
    except (ValueError, RecursionError):
        raise BadJson("request body is not valid JSON", "body") from None
    try:
        return msgspec.convert(_integral(parsed), kind, strict=True)
    except msgspec.ValidationError as exc:
        raise invalid(str(exc)) from None


def _integral(value: Any) -> Any:
    """Numbers written with a zero fraction (``7.0``, ``1e3``) as the integers they are: JSON
    Schema's ``integer``, which the OpenAPI document uses, includes them. Only on the slow path:
    the fast decoder takes the usual ``7``."""
    if type(value) is float and value.is_integer():
        return int(value)
    if type(value) is list:
        return [_integral(v) for v in value]
    if type(value) is dict:
        return {k: _integral(v) for k, v in value.items()}
    return value


def _json_type(ctype: str) -> bool:
    base = ctype.split(";", 1)[0].strip().lower()
    return base == "application/json" or (base.startswith("application/") and base.endswith("+json"))


def invalid(error: str) -> InvalidInput:
    """msgspec's message (``Expected `int`, got `str` - at `$.items[0].n```) as our error: the
    field named like the service names it (``items[0].n``)."""
    m = _AT.match(error)
    message, path = (m.group("msg"), (m.group("path") or "").lstrip(".")) if m else (error, "")
    named = _NAMED.match(message)
    if named:
        name = named.group("name")
        text = "field required" if named.group("what") == "missing required" \
            else "extra inputs are not permitted"
        return InvalidInput(text, f"{path}.{name}" if path else name)
    if not path:
        return InvalidInput(NOT_A_JSON_OBJECT, "body")
    if message.startswith("Expected `int | str`"):
        message = "must be an int64 or a string id"
    return InvalidInput(message, path)


# -- the application ------------------------------------------------------------------------------


class HttpMetrics:
    """Requests and latency by route template; the labelled children are kept, not looked up
    (and locked) again on every request."""

    def __init__(self, requests: Counter, latency: Histogram) -> None:
        self._requests, self._latency = requests, latency
        self._counts: dict[tuple[str, str, int], Any] = {}
        self._times: dict[str, Any] = {}

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        key = (endpoint, method, status)
        child = self._counts.get(key)
        if child is None:
            child = self._counts[key] = self._requests.labels(endpoint, method, str(status))
        child.inc()
        timer = self._times.get(endpoint)
        if timer is None:
            timer = self._times[endpoint] = self._latency.labels(endpoint)
        timer.observe(seconds)


def error_body(exc: TallyError) -> bytes:
    return msgspec.json.encode(exc.to_dict())


class HttpApp:
    """The ASGI application; ``startup``/``shutdown`` are its lifespan (``lifespan()`` for tests
    and embedding)."""

    def __init__(self, router: Router, metrics: HttpMetrics, max_body: int,
                 startup: Callable[[], Awaitable[None]], shutdown: Callable[[], Awaitable[None]],
                 guard: Guard | None = None, limiter: Limiter | None = None,
                 body_timeout_s: float = 0.0) -> None:
        self.router, self.metrics, self.max_body = router, metrics, max_body
        self.startup, self.shutdown = startup, shutdown
        self.guard, self.limiter, self.body_timeout_s = guard, limiter, body_timeout_s
        self._deadlines = Deadlines()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self.http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        answer = await self.answer(scope, lambda: self.read_body(scope, receive))
        headers = [(b"content-type", answer.media), *answer.extra]
        if answer.stream is None:
            headers.append((b"content-length", str(len(answer.payload)).encode()))
            await send({"type": "http.response.start", "status": answer.status,
                        "headers": headers})
            await send({"type": "http.response.body", "body": answer.payload})
        else:
            await send({"type": "http.response.start", "status": answer.status,
                        "headers": headers})
            async for chunk in answer.stream:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        self.observe(answer, scope["method"], start)

    def observe(self, answer: Answer, method: str, start: float) -> None:
        self.metrics.observe(answer.endpoint, method, answer.status, time.perf_counter() - start)

    async def answer(self, scope: Scope,
                     body: Callable[[], Awaitable[tuple[bytes, str | None]]]) -> Answer:
        """The answer to a request, whatever server delivers it: ``body`` reads the request's
        body and content type (called only for a method that has one, after the credential)."""
        method, path = scope["method"], scope["path"]
        endpoint = "unmatched"
        try:
            route, params, who, routing_error = self._route(scope, method, path)
            # The body before a routing error, so a request over the limit is refused whole,
            # routed or not; but after the credential, so a stranger cannot make us read it.
            content, ctype = (b"", None) if method == "GET" else await body()
            if route is None:
                raise routing_error or NotFound("Not Found", "path")
            endpoint = route.path
            if self.limiter is not None and route.access != "public":
                await self.limiter.check_key(who)
            result = await route.handler(Request(method, path, params, content,
                                                 scope.get("query_string", b""), ctype, who,
                                                 self.limiter))
            if type(result) is bytes:
                return Answer(endpoint, 200, result, JSON[1])
            assert isinstance(result, Response)
            if isinstance(result.body, bytes):
                return Answer(endpoint, result.status, result.body, result.media_type)
            return Answer(endpoint, result.status, b"", result.media_type, stream=result.body)
        except TallyError as exc:
            if isinstance(exc, BodyTooLarge):
                endpoint = self.router.endpoint_of(path)
            return Answer(endpoint, exc.status, error_body(exc), JSON[1], exc.headers)

    def _route(self, scope: Scope, method: str, path: str
               ) -> tuple[Route | None, dict[str, str], Principal, TallyError | None]:
        """The route, its path parameters and the principal; or the routing error, raised after
        the body is read (see ``http``). A refused credential is raised at once."""
        try:
            route, params = self.router.find(method, path)
        except TallyError as exc:
            return None, {}, LOOPBACK, exc
        if self.guard is None or route.access == "public":
            return route, params, LOOPBACK, None
        return route, params, self.guard.principal(route.access, scope["headers"],
                                                   scope.get("client")), None

    async def read_body(self, scope: Scope, receive: Receive) -> tuple[bytes, str | None]:
        """The body within the body timeout (408 past it; the server's own header timeout
        covers the headers, tally.api.server). The deadline is a dict entry (``Deadlines``),
        not a timer: almost every body is already in when the request is routed."""
        if not self.body_timeout_s:
            return await self._read_body(scope, receive)
        task = asyncio.current_task()
        assert task is not None
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            task.cancel()

        self._deadlines.set(task, self.body_timeout_s, expire, task.get_loop())
        try:
            return await self._read_body(scope, receive)
        except asyncio.CancelledError:
            if not expired or task.uncancel() > 0:
                raise
            raise RequestTimeout(f"request body not received within {self.body_timeout_s:g} s",
                                 "body") from None
        finally:
            self._deadlines.clear(task)

    async def whole_body(self, scope: Scope, body: bytes) -> tuple[bytes, str | None]:
        """A body the server already holds whole (``tally.api.server``): the same checks as
        ``_read_body``, without the reads."""
        ctype = self._content_type(scope)
        if len(body) > self.max_body:
            raise self._too_large()
        return body, ctype

    def _content_type(self, scope: Scope) -> str | None:
        """The content type; 413 at once if the declared length is over the limit."""
        ctype = None
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body:
                raise self._too_large()
            if name == b"content-type":
                ctype = value.decode("latin-1")
        return ctype

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[bytes, str | None]:
        """The whole body, refused (413) as soon as it is known to be over the limit."""
        ctype = self._content_type(scope)
        message = await receive()
        body = message.get("body", b"")
        if not message.get("more_body", False):
            if len(body) > self.max_body:
                raise self._too_large()
            return body, ctype
        chunks, size = [body], len(body)
        while message.get("more_body", False):
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                raise self._too_large()
        return b"".join(chunks), ctype

    def _too_large(self) -> BodyTooLarge:
        return BodyTooLarge(f"request body is over {self.max_body} bytes", "body")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        try:
            await self.startup()
        except BaseException as exc:
            await send({"type": "lifespan.startup.failed", "message": repr(exc)})
            raise
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await self.shutdown()
        await send({"type": "lifespan.shutdown.complete"})
