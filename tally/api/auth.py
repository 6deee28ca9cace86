"""Who may call what: the admin token, the client API keys and the loopback rule.

Three kinds of route (``Route.access``): ``public`` (liveness, readiness, the OpenAPI document
and /docs), ``client`` (the /v1 counters API) and ``admin`` (/v1/admin/*, /metrics). A request
shows a credential as ``Authorization: Bearer <secret>``:

- the admin token (``TALLY_ADMIN_TOKEN`` or ``admin_token_file``) may call everything; it is
  compared with ``hmac.compare_digest``;
- an API key (``api_keys_file``) may call the client routes, and write only the counters its
  ``counters`` list names (every counter when it names none). Keys are found by the SHA-256 of
  the secret, so the lookup's timing depends on a hash, never on how much of a secret matched.

With no admin token configured, admin routes answer loopback clients only; with no keys file,
client routes do too (a development default that is safe because nothing off the machine can
reach it). The user id in a request is asserted by the calling backend, which the key
identifies: Tally does not authenticate end users.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import logging
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tally.core.errors import ConfigError, Forbidden, Unauthorized

log = logging.getLogger("tally.auth")

ADMIN_TOKEN_ENV = "TALLY_ADMIN_TOKEN"
MIN_SECRET = 16  # characters: a shorter token is a password to guess, not a key


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is: a key's name, ``admin`` or ``loopback``; what it may write."""

    name: str
    admin: bool = False
    counters: frozenset[str] | None = None  # None: every counter

    def check_write(self, counter: str) -> None:
        if self.counters is not None and counter not in self.counters:
            raise Forbidden(f"API key {self.name!r} may not write counter {counter!r}", "counter")


ADMIN = Principal("admin", admin=True)
LOOPBACK = Principal("loopback")


def is_loopback(client: Any) -> bool:
    """``client`` is the ASGI scope's (host, port); a Unix socket (None) counts as local."""
    return True if not client else _loopback_host(client[0])


@functools.lru_cache(maxsize=4096)
def _loopback_host(host: str) -> bool:
    """Cached: parsing the address on every request would cost more than the rest of the check."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_admin_token(path: str, env: dict[str, str] | None = None) -> bytes | None:
    env = dict(os.environ) if env is None else env
    raw = env.get(ADMIN_TOKEN_ENV)
    if raw is None and path:
        try:
            raw = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"admin_token_file {path}: {exc.strerror}") from exc
    if raw is None or raw == "":
        return None
    if len(raw) < MIN_SECRET:
        raise ConfigError(f"the admin token must be at least {MIN_SECRET} characters")
    return raw.encode()


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


def parse_keys(text: str, source: str) -> dict[bytes, Principal]:
    """``[[key]]`` tables: ``name`` (shown in logs and metrics), ``key`` (the secret) and
    optionally ``counters`` (the counters it may write). A bad file is refused whole."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    keys: dict[bytes, Principal] = {}
    names: set[str] = set()
    for n, entry in enumerate(doc.get("key", [])):
        where = f"{source}: key[{n}]"
        name, secret, counters = entry.get("name"), entry.get("key"), entry.get("counters")
        if not isinstance(name, str) or not name or name in names or name in ("admin", "loopback"):
            raise ConfigError(f"{where}: name must be a unique, non-empty string")
        if not isinstance(secret, str) or len(secret) < MIN_SECRET:
            raise ConfigError(f"{where}: key must be a string of at least {MIN_SECRET} characters")
        if counters is not None and not (isinstance(counters, list)
                                         and all(isinstance(c, str) for c in counters)):
            raise ConfigError(f"{where}: counters must be a list of counter names")
        unknown = set(entry) - {"name", "key", "counters"}
        if unknown:
            raise ConfigError(f"{where}: unknown fields {sorted(unknown)}")
        names.add(name)
        keys[_digest(secret.encode())] = Principal(
            name, counters=None if counters is None else frozenset(counters))
    return keys


class KeyFile:
    """The keys file, re-read when its modification time changes (checked by ``refresh``, which
    the app calls every few seconds and on SIGHUP). A file that fails to parse leaves the keys
    in force and logs why: a typo must not lock every client out, nor let everyone in."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.keys: dict[bytes, Principal] = {}
        self._stamp: tuple[int, int] | None = None
        self.refresh(strict=True)

    def refresh(self, strict: bool = False) -> bool:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return False
            keys = parse_keys(Path(self.path).read_text(), self.path)
        except (OSError, ConfigError) as exc:
            if strict:
                raise ConfigError(f"api_keys_file: {exc}") from exc
            log.error("api keys file %s not reloaded, the previous keys stay in force: %s",
                      self.path, exc)
            return False
        self._stamp, self.keys = stamp, keys
        log.info("api keys loaded from %s: %s", self.path,
                 ", ".join(sorted(p.name for p in keys.values())) or "none")
        return True


class Guard:
    """Finds the principal of a request, or refuses it (401, 403)."""

    def __init__(self, admin_token: bytes | None, keys: KeyFile | None) -> None:
        self.admin_token = admin_token
        self.keys = keys

    def announce(self, host: str) -> None:
        """Says at start-up which rule is in force, so an operator sees an open door."""
        if self.admin_token is None:
            log.warning("no admin token configured (%s or admin_token_file): admin routes and "
                        "/metrics answer loopback clients only", ADMIN_TOKEN_ENV)
        if self.keys is None:
            log.warning("no api_keys_file configured: client routes answer loopback clients "
                        "only%s", "" if is_loopback((host, 0)) else
                        f" (listening on {host}, remote clients get 403)")

    def principal(self, access: str, headers: list[tuple[bytes, bytes]], client: Any
                  ) -> Principal:
        secret = _bearer(headers)
        if secret is not None:
            if self.admin_token is not None and hmac.compare_digest(secret, self.admin_token):
                return ADMIN
            found = self.keys.keys.get(_digest(secret)) if self.keys is not None else None
            if found is None:
                raise Unauthorized("unknown credential", "authorization")
            if access == "admin":
                raise Forbidden(f"API key {found.name!r} may not call admin routes",
                                "authorization")
            return found
        configured = self.admin_token if access == "admin" else self.keys
        if configured is not None:
            raise Unauthorized("this route needs Authorization: Bearer <credential>",
                               "authorization")
        if is_loopback(client):
            return LOOPBACK
        raise Forbidden("served to loopback clients only: no credential is configured",
                        "authorization")


def _bearer(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, secret = value.partition(b" ")
            if scheme.lower() != b"bearer" or not secret.strip():
                raise Unauthorized("Authorization must be 'Bearer <credential>'", "authorization")
            return secret.strip()
    return None
