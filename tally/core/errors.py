"""One error hierarchy; each class carries the HTTP status it is rendered with, in one handler."""

from __future__ import annotations


class TallyError(Exception):
    status = 500
    code = "internal"

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


class NotFound(TallyError):
    status = 404
    code = "not_found"


class Unavailable(TallyError):
    """A backend could not take the write; the client may retry (writes are idempotent)."""

    status = 503
    code = "unavailable"


class ConfigError(TallyError):
    """Settings that cannot run; raised before the service starts."""

    code = "config"
