"""A service's `websocket` table (with `transport = "websocket"`): the HTTP upgrade's path,
origins, headers and timeout, how bytes become messages, their bound, pings, the console page.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from gsrv.config import keys
from gsrv.config.keys import key
from gsrv.config.table import Table
from gsrv.config.units import describe

HEADER_NAME = re.compile(r"^[A-Za-z0-9-]+$")
# Request headers a child never gets: HTTP_PROXY would steer the child's own HTTP clients
# (httpoxy); the others are the handshake's own or gsrv's business.
NEVER_PASSED = ("proxy", "upgrade", "connection", "sec-websocket-key", "sec-websocket-version")


def _path(t: Table, name: str, default: object) -> str:
    value = t.data.get(name, default)
    if not isinstance(value, str) or not value.startswith("/") or "?" in value or "#" in value:
        raise t.fail(name, f'must be a URL path like "/" or "/ws" (got {describe(value)})')
    return value


def _origins(t: Table, name: str, default: object) -> tuple[str, ...]:
    """Origins a browser page may connect from besides the Host's own: "https://host[:port]", or "*"."""
    origins = t.strings(name, tuple(default) if isinstance(default, list) else ())
    for origin in origins:
        if origin == "*":
            continue
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
            raise t.fail(name, f'must list origins like "https://example.com" or "http://host:8080", or "*" '
                         f'(got "{origin}")')  # fmt: skip
    return tuple(origin.lower() for origin in origins)


def _headers(t: Table, name: str, default: object) -> tuple[str, ...]:
    headers = t.strings(name, ())
    for header in headers:
        if not HEADER_NAME.match(header):
            raise t.fail(name, f'must list request header names like "User-Agent" (got "{header}")')
        if header.lower() in NEVER_PASSED:
            why = (
                "HTTP_PROXY would steer the child's own HTTP clients"
                if header.lower() == "proxy"
                else "the handshake's"
            )
            raise t.fail(name, f'cannot pass "{header}" to the child ({why})')
    return tuple(header.lower() for header in headers)


@dataclass(frozen=True)
class WebSocketConfig:
    """The keys of a service's `websocket` table."""

    path: str = key(_path, "/", "the URL path of the upgrade (and of the console page); others get 404")
    messages: str = key(keys.choice("text", "binary"), "text", '"text": a message per line each way | "binary": '
                        "a byte stream, split into messages of any size", shown=True)  # fmt: skip
    origins: tuple[str, ...] = key(_origins, [], "origins allowed besides the Host's own (a request without "
                                   'Origin, not from a browser page, is allowed); "*" allows any')  # fmt: skip
    max_message: int = key(keys.size(16, 1024 * 1024), None, "text: the longest line of output (default: "
                           "chunk_size); a longer one closes with 1009", example="64KiB", value=0)  # fmt: skip
    ping_interval: float = key(keys.duration("off"), "30s", "ping the client this often; 0s = off", shown=True)
    ping_timeout: float = key(keys.duration(), "10s", "no pong within this after a ping: the session ends "
                              "(client_reset)")  # fmt: skip
    handshake_timeout: float = key(keys.duration(), "10s", "the HTTP upgrade must be complete by then (bad_request)")
    headers: tuple[str, ...] = key(_headers, [], "request headers the child gets as HTTP_NAME (never Proxy)",
                                   example=["User-Agent"])  # fmt: skip
    console: bool = key(keys.flag(), False, "a plain browser GET of path gets a page to try the service")


def parse_websocket(t: Table, name: str, chunk_size: int) -> WebSocketConfig:
    data: Any = t.data.get(name, {})
    if not isinstance(data, dict):
        raise t.fail(name, f'must be a table like {{ path = "/ws", messages = "binary" }} (got {describe(data)})')
    inner = Table(t.file, f"{t.name}.{name}", data, keys.names(WebSocketConfig))
    values = keys.read_all(inner, WebSocketConfig)
    values.setdefault("max_message", chunk_size)
    return WebSocketConfig(**values)
