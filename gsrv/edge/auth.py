"""Who may start a service's command over HTTP or WebSocket (`auth`): the Authorization header
checked before any child, a password verified in gevent's thread pool (bcrypt is slow on
purpose: never on the event loop) and a success remembered for the credentials' file as loaded.

Failures are counted per client address (an IPv6 one by its /64), and a verification in flight
counts as one until it passes: an address starts at most failures_per_minute verifications a
minute, then gets 429 before any. At most VERIFYING_MAX verifications run at once across the
server; one that finds no slot before its client's handshake deadline gets 429. An unknown
user costs the same verification as a known one (against the file's first hash), so the
answer's timing does not tell which users exist.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import time
from collections import OrderedDict, deque

import bcrypt
from gevent import get_hub
from gevent.lock import BoundedSemaphore
from passlib.hash import sha256_crypt, sha512_crypt

from gsrv.config.auth import Credentials, same_token
from gsrv.edge.httphead import HeadError

WINDOW_S = 60.0
CACHE_MAX = 4096  # successes remembered per credentials file, then forgotten all at once
ADDRESSES_MAX = 10_000  # addresses whose failures are counted, the least recently seen forgotten first
VERIFYING_MAX = 4  # verifications running at once, across the server (gevent's pool has 10 threads)
ANSWER_S = 0.2  # of a client's handshake time: kept for its 429 to go out when no slot came


def verify(password: bytes, hashed: str) -> bool:
    """In a pool thread. A password a library refuses (bcrypt's 72-byte limit) is a failure."""
    try:
        if hashed.startswith("$2"):
            return bool(bcrypt.checkpw(password, hashed.encode()))
        scheme = sha256_crypt if hashed.startswith("$5$") else sha512_crypt
        return bool(scheme.verify(password, hashed))
    except ValueError:
        return False


class Verifications:
    """The server's password verifications: at most `limit` run at once in gevent's pool. A
    slot is held until its thread returns, even when the greenlet that waited for it was killed
    (a client's deadline): bcrypt running in the pool is what the limit bounds."""

    def __init__(self, limit: int = VERIFYING_MAX) -> None:
        self._slots = BoundedSemaphore(limit)

    def run(self, password: bytes, hashed: str, patience: float) -> bool | None:
        """Whether the password matches; None when no slot came within `patience` seconds."""
        if not self._slots.acquire(timeout=max(0.0, patience)):
            return None
        try:
            result = get_hub().threadpool.spawn(verify, password, hashed)  # may wait for a pool thread
        except BaseException:  # (killed while it waited: the slot is not held by any thread)
            self._slots.release()
            raise
        result.rawlink(lambda _done: self._slots.release())
        return bool(result.get())


VERIFICATIONS = Verifications()  # one per process, as gevent's thread pool is


def address_key(address: str | None) -> str:
    """Whose failures these are: an IPv4 address, an IPv6 one's /64 (one host holds a whole
    /64), "" for a Unix socket's clients."""
    if not address or ":" not in address:
        return address or ""
    try:
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    except ValueError:
        return address


class Gatekeeper:
    """One service's authentication, across reloads (its credentials follow the config)."""

    def __init__(self, verifications: Verifications = VERIFICATIONS) -> None:
        self.credentials: Credentials | None = None
        self.verifications = verifications
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._known: dict[bytes, str] = {}  # sha256 of an Authorization that passed -> its user

    def update(self, credentials: Credentials | None) -> None:
        if credentials != self.credentials:
            self.credentials, self._known = credentials, {}

    def check(self, authorization: str | None, address: str | None, deadline: float) -> tuple[str, str] | None:
        """(user, AUTH_TYPE) when the header passes; None when the service has no auth.
        `deadline`: the client's handshake deadline (time.monotonic()) a verification may wait
        for a slot until. Raises HeadError: 401 (with the challenge to send), 429 over the
        failure limit or with no verification slot in time."""
        credentials = self.credentials
        if credentials is None:
            return None
        key = hashlib.sha256((authorization or "").encode("utf-8", "surrogatepass")).digest()
        user = self._known.get(key)
        if user is None:
            failures, now = self._failures_of(address), time.monotonic()
            while failures and failures[0] < now - WINDOW_S:
                failures.popleft()
            if len(failures) >= credentials.failures_per_minute:
                raise HeadError(429, "auth_limited", f"{len(failures)} failed attempts from this address in a minute")
            failures.append(now)  # a failure until it passes
            scheme, _, value = (authorization or "").strip().partition(" ")
            try:
                user = self._verify(credentials, scheme.lower(), value.strip(), deadline)
            except HeadError:  # no verification slot: not this client's failure
                self._passed(address, failures, now)
                raise
            if user is None:
                raise HeadError(401, "unauthorized", "no valid credentials" if authorization else "credentials needed")
            self._passed(address, failures, now)
        if len(self._known) >= CACHE_MAX:
            self._known = {}
        self._known[key] = user
        return user, "Basic" if credentials.kind == "basic" else "Bearer"

    def _failures_of(self, address: str | None) -> deque[float]:
        key = address_key(address)
        failures = self._failures.get(key)
        if failures is None:
            failures = self._failures[key] = deque()
            while len(self._failures) > ADDRESSES_MAX:
                self._failures.popitem(last=False)
        else:
            self._failures.move_to_end(key)
        return failures

    def _passed(self, address: str | None, failures: deque[float], at: float) -> None:
        with contextlib.suppress(ValueError):  # gone already: over a minute old
            failures.remove(at)
        key = address_key(address)
        if not failures and self._failures.get(key) is failures:
            del self._failures[key]

    def _verify(self, credentials: Credentials, scheme: str, value: str, deadline: float) -> str | None:
        if credentials.kind == "bearer":
            if scheme != "bearer":
                return None
            matches = [n for n, token in enumerate(credentials.tokens, 1) if same_token(value, token)]
            return f"token-{matches[0]}" if matches else None
        if scheme != "basic":
            return None
        try:
            user, colon, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except ValueError:  # not base64 (binascii.Error), not ASCII, not UTF-8 (UnicodeDecodeError)
            return None
        if not colon:
            return None
        hashed = credentials.hash_of(user)
        decoy = hashed is None  # an unknown user: the same verification, against the first hash
        patience = deadline - time.monotonic() - ANSWER_S
        matched = self.verifications.run(password.encode(), hashed or credentials.users[0][1], patience)
        if matched is None:
            raise HeadError(429, "auth_busy", "every password verification slot stayed busy")
        return user if matched and not decoy else None

    def challenge(self) -> tuple[tuple[str, str], ...]:
        credentials = self.credentials
        if credentials is None:
            return ()
        kind = "Basic" if credentials.kind == "basic" else "Bearer"
        return (("WWW-Authenticate", f'{kind} realm="{credentials.realm}", charset="UTF-8"'),)
