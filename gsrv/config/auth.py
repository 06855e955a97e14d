"""A service's `auth` key (HTTP and WebSocket transports): who may start its command, from a
file read at load and at every SIGHUP (a broken file keeps the running config): `basic`, an
htpasswd file of bcrypt (`htpasswd -B`: $2y$) or SHA-crypt (`-2`: $5$, `-5`: $6$) entries, or
`bearer`, one token per line.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from typing import Any

from gsrv.config.table import Table
from gsrv.config.units import describe

SCHEMES = {"$2y$": "bcrypt", "$2b$": "bcrypt", "$2a$": "bcrypt", "$5$": "sha256_crypt", "$6$": "sha512_crypt"}
TOKEN = re.compile(r"^[\x21-\x7e]{16,}$")  # printable, no spaces, long enough to be unguessable
FAILURES_PER_MINUTE = 10  # failed attempts an address may make in a minute; then 429


@dataclass(frozen=True)
class Credentials:
    """What the file said: users and their hashes (basic), or tokens (bearer)."""

    kind: str  # "basic" | "bearer"
    path: str
    users: tuple[tuple[str, str], ...] = ()  # (user, hash)
    tokens: tuple[str, ...] = ()
    realm: str = "gsrv"
    failures_per_minute: int = FAILURES_PER_MINUTE

    def hash_of(self, user: str) -> str | None:
        return next((hashed for name, hashed in self.users if name == user), None)


def same_token(given: str, token: str) -> bool:
    """A constant-time comparison of two texts a client may have sent (any characters, lone
    surrogates from JSON included: never a TypeError or an encoding error)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), token.encode("utf-8", "surrogatepass"))


def parse_auth(t: Table, name: str, default: object) -> Credentials | None:
    data: Any = t.data.get(name)
    if data is None:
        return None
    shape = '{ basic = "/etc/gsrv/htpasswd" } or { bearer = "/etc/gsrv/tokens" }'
    if not isinstance(data, dict) or len({"basic", "bearer"} & set(data)) != 1:
        raise t.fail(name, f"must be a table like {shape} (got {describe(data)})")
    unknown = set(data) - {"basic", "bearer", "realm", "failures_per_minute"}
    if unknown:
        raise t.fail(name, f"has no key {sorted(unknown)[0]!r} (known: basic, bearer, realm, failures_per_minute)")
    kind = "basic" if "basic" in data else "bearer"
    path, realm = data[kind], data.get("realm", "gsrv")
    limit = data.get("failures_per_minute", FAILURES_PER_MINUTE)
    if not isinstance(path, str) or not path.startswith("/"):
        raise t.fail(name, f"{kind} must be a file's absolute path (got {describe(path)})")
    if not isinstance(realm, str) or '"' in realm or not realm.isprintable():
        raise t.fail(name, f"realm must be printable text without quotes (got {describe(realm)})")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise t.fail(name, f"failures_per_minute must be an integer >= 1 (got {describe(limit)})")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip() and not line.startswith("#")]
    except (OSError, UnicodeDecodeError) as e:
        raise t.fail(name, f"{kind} file {path} cannot be read: {getattr(e, 'strerror', None) or e}") from None
    if not lines:
        raise t.fail(name, f"{kind} file {path} has no entries")
    if kind == "bearer":
        for n, token in lines:
            if not TOKEN.match(token):
                raise t.fail(name, f"{path} line {n}: a token must be 16 or more printable characters, no spaces")
        return Credentials(kind, path, tokens=tuple(token for _, token in lines), realm=realm,
                           failures_per_minute=limit)  # fmt: skip
    users = []
    for n, line in lines:
        user, colon, hashed = line.partition(":")
        if not colon or not user or not any(hashed.startswith(prefix) for prefix in SCHEMES):
            raise t.fail(name, f"{path} line {n}: expected user:hash with a bcrypt hash (htpasswd -B: $2y$) or a "
                         f"SHA-crypt one (htpasswd -2: $5$, -5: $6$) (got {line.split(':')[0]!r}:...)")  # fmt: skip
        users.append((user, hashed))
    return Credentials(kind, path, users=tuple(users), realm=realm, failures_per_minute=limit)
