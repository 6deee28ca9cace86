"""One error hierarchy; each class carries the HTTP status it is rendered with, in one handler."""

from __future__ import annotations

import math


class TallyError(Exception):
    status = 500
    code = "internal"
    headers: tuple[tuple[bytes, bytes], ...] = ()  # extra response headers (Allow, Retry-After)

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def within(self, prefix: str) -> None:
        """Names the field inside an entry of a list (``ops[3].``): the prefix is formatted only
        when something fails, not for each of the 500 entries of a valid request."""
        self.field = prefix + self.field if self.field else prefix.rstrip(".")

    def to_dict(self) -> dict[str, object]:
        body: dict[str, object] = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return {"error": body}


class InvalidInput(TallyError):
    """The request names something malformed or unknown; nothing was written."""

    status = 422
    code = "invalid"


class BadJson(InvalidInput):
    """The body is not JSON at all (or nests deeper than the parser allows)."""

    status = 400
    code = "bad_json"


class LimitExceeded(InvalidInput):
    status = 422
    code = "limit_exceeded"


class BodyTooLarge(TallyError):
    status = 413
    code = "body_too_large"


class Unauthorized(TallyError):
    """No credential, or one that is not known: the client should authenticate."""

    status = 401
    code = "unauthorized"
    headers = ((b"www-authenticate", b"Bearer"),)


class Forbidden(TallyError):
    """A known credential (or the client's address) that may not do this."""

    status = 403
    code = "forbidden"


class RateLimited(TallyError):
    """Over a token bucket; ``retry_after_s`` is when the bucket holds a token again."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, field: str | None, retry_after_s: float) -> None:
        super().__init__(message, field)
        self.retry_after_s = retry_after_s
        # Whole seconds, rounded up, as RFC 9110 has it (never 0, which would invite a hot loop).
        self.headers = ((b"retry-after", str(max(1, math.ceil(retry_after_s))).encode()),)


class RequestTimeout(TallyError):
    """The client did not send its request (headers or body) in time."""

    status = 408
    code = "timeout"
    headers = ((b"connection", b"close"),)


class NotFound(TallyError):
    status = 404
    code = "not_found"


class Unavailable(TallyError):
    """A backend could not take the write; the client may retry (writes are idempotent).
    ``retry_after_s``: when retrying is worth it, sent as Retry-After."""

    status = 503
    code = "unavailable"

    def __init__(self, message: str, field: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message, field)
        if retry_after_s is not None:
            self.headers = ((b"retry-after", str(max(1, math.ceil(retry_after_s))).encode()),)


class ConfigError(TallyError):
    """Settings that cannot run; raised before the service starts."""

    code = "config"
