"""Who may start a service's command over HTTP or WebSocket (`auth`): the Authorization header
checked before any child, a password verified in gevent's thread pool (bcrypt is slow on
purpose: never on the event loop) and a success remembered for the credentials' file as loaded,
failures counted per client address (over failures_per_minute: 429 before any check).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections import deque

import bcrypt
from gevent import get_hub
from passlib.hash import sha256_crypt, sha512_crypt

from gsrv.config.auth import Credentials
from gsrv.edge.httphead import HeadError

WINDOW_S = 60.0
CACHE_MAX = 4096  # successes remembered per credentials file, then forgotten all at once


def verify(password: bytes, hashed: str) -> bool:
    """In a pool thread. A password a library refuses (bcrypt's 72-byte limit) is a failure."""
    try:
        if hashed.startswith("$2"):
            return bool(bcrypt.checkpw(password, hashed.encode()))
        scheme = sha256_crypt if hashed.startswith("$5$") else sha512_crypt
        return bool(scheme.verify(password, hashed))
    except ValueError:
        return False


class Gatekeeper:
    """One service's authentication, across reloads (its credentials follow the config)."""

    def __init__(self) -> None:
        self.credentials: Credentials | None = None
        self._failures: dict[str, deque[float]] = {}
        self._known: dict[bytes, str] = {}  # sha256 of an Authorization that passed -> its user

    def update(self, credentials: Credentials | None) -> None:
        if credentials != self.credentials:
            self.credentials, self._known = credentials, {}

    def check(self, authorization: str | None, address: str | None) -> tuple[str, str] | None:
        """(user, AUTH_TYPE) when the header passes; None when the service has no auth.
        Raises HeadError: 401 (with the challenge to send), 429 over the failure limit."""
        credentials = self.credentials
        if credentials is None:
            return None
        failures = self._failures.setdefault(address or "", deque())
        now = time.monotonic()
        while failures and failures[0] < now - WINDOW_S:
            failures.popleft()
        if len(failures) >= credentials.failures_per_minute:
            raise HeadError(429, "auth_limited", f"{len(failures)} failed attempts from this address in a minute")
        scheme, _, value = (authorization or "").strip().partition(" ")
        key = hashlib.sha256((authorization or "").encode("latin-1", "replace")).digest()
        user = self._known.get(key) or self._verify(credentials, scheme.lower(), value.strip())
        if user is None:
            failures.append(now)
            raise HeadError(401, "unauthorized", "no valid credentials" if authorization else "credentials needed")
        if len(self._known) >= CACHE_MAX:
            self._known = {}
        self._known[key] = user
        if not failures:
            self._failures.pop(address or "", None)
        return user, "Basic" if credentials.kind == "basic" else "Bearer"

    def _verify(self, credentials: Credentials, scheme: str, value: str) -> str | None:
        if credentials.kind == "bearer":
            if scheme != "bearer":
                return None
            matches = [n for n, token in enumerate(credentials.tokens, 1) if hmac.compare_digest(value, token)]
            return f"token-{matches[0]}" if matches else None
        if scheme != "basic":
            return None
        try:
            user, colon, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        hashed = credentials.hash_of(user)
        if not colon or hashed is None:
            return None
        return user if get_hub().threadpool.apply(verify, (password.encode(), hashed)) else None

    def challenge(self) -> tuple[tuple[str, str], ...]:
        credentials = self.credentials
        if credentials is None:
            return ()
        kind = "Basic" if credentials.kind == "basic" else "Bearer"
        return (("WWW-Authenticate", f'{kind} realm="{credentials.realm}", charset="UTF-8"'),)
