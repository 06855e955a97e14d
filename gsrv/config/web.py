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


def _hosts(t: Table, name: str, default: object) -> tuple[str, ...]:
    hosts = t.strings(name, ())
    for host in hosts:
        if host != "*" and not re.match(r"^[a-z0-9.-]+$|^\[[0-9a-f:.]+\]$", host.lower()):
            raise t.fail(name, f'must list host names like "app.example" (no port), or "*" (got "{host}")')
    return tuple(host.lower().strip("[]") for host in hosts)


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

    path: str = key(_path, "/", "the URL path of the upgrade (and of the console page); others get 404", shown=True)
    messages: str = key(keys.choice("text", "binary"), "text", '"text": a message per line each way | "binary": '
                        "a byte stream, split into messages of any size", shown=True)  # fmt: skip
    origins: tuple[str, ...] = key(_origins, [], "origins allowed besides the Host's own (a request without "
                                   'Origin, not from a browser page, is allowed); "*" allows any',
                                   shown=True)  # fmt: skip
    max_message: int = key(keys.size(16, 1024 * 1024), None, "text: the longest line of output (default: "
                           "chunk_size); a longer one closes with 1009", example="64KiB", value=0,
                           shown=True)  # fmt: skip
    ping_interval: float = key(keys.duration("off"), "30s", "ping the client this often; 0s = off", shown=True)
    ping_timeout: float = key(keys.duration(), "10s", "no pong within this after a ping: the session ends "
                              "(client_reset)", shown=True)  # fmt: skip
    handshake_timeout: float = key(keys.duration(), "10s", "the HTTP upgrade must be complete by then (bad_request)",
                                   shown=True)  # fmt: skip
    headers: tuple[str, ...] = key(_headers, [], "request headers the child gets as HTTP_NAME (never Proxy)",
                                   example=["User-Agent"], shown=True)  # fmt: skip
    console: bool = key(keys.flag(), False, "a plain browser GET of path gets a page to try the service",
                        shown=True)  # fmt: skip
    hosts: tuple[str, ...] = key(_hosts, [], "Host names answered besides loopback ones on a loopback listener "
                                 '(elsewhere, when set: only these); "*" = any; another Host gets 403',
                                 shown=True)  # fmt: skip
    reattach_buffer: int = key(keys.size(64 * 1024, 64 * 1024 * 1024), "256KiB", "typed framing, a client that "
                               'acknowledges ("a" messages; the terminal page does): output sent and not yet '
                               "acknowledged, at most this; then gsrv stops reading the child", shown=True)  # fmt: skip
    reattach: float = key(keys.duration("off"), "0s", "pty = true: a terminal page's session outlives a "
                          "connection that drops without a close this long, its output kept (reattach_buffer) "
                          "for the page to reconnect to with the session's token; 0s = off", example="5m",
                          shown=True)  # fmt: skip
    share: str = key(keys.choice("off", "read-only", "read-write"), "off", 'pty = true: the terminal page\'s '
                     "driver gets a watch token; a page with it sees the session live (read-write: types too); "
                     "one that falls reattach_buffer behind is closed (4413)", shown=True)  # fmt: skip
    local_only: bool = False  # derived: the service listens on loopback or a unix socket
    pty: bool = False  # derived: the service's pty key


def parse_websocket(t: Table, name: str, chunk_size: int, pty: bool, local_only: bool) -> WebSocketConfig:
    """The table; with a pty, messages default to "binary" (a terminal's output is a stream:
    a prompt ends without a newline, and text mode would hold it back until one)."""
    data: Any = t.data.get(name, {})
    if not isinstance(data, dict):
        raise t.fail(name, f'must be a table like {{ path = "/ws", messages = "binary" }} (got {describe(data)})')
    inner = Table(t.file, f"{t.name}.{name}", data, keys.names(WebSocketConfig))
    values = keys.read_all(inner, WebSocketConfig)
    if pty:
        if data.get("messages") == "text":
            raise inner.fail("messages", 'is "text", which waits for whole lines: with pty = true a prompt ends '
                             'without a newline and would never arrive (use "binary", the default with a pty)',
                             )  # fmt: skip
        values["messages"] = "binary"
    if values["share"] != "off" and not pty:
        raise inner.fail("share", "lets others watch a terminal's session: it needs pty = true")
    if values["reattach"] and not pty:
        raise inner.fail("reattach", "keeps a terminal's session for its page to reconnect to: it needs pty = "
                         "true (a stream without a terminal has no screen to come back to)")  # fmt: skip
    if "max_message" in data and values["messages"] == "binary":
        raise inner.fail("max_message", 'bounds a text line; with messages = "binary" output goes out as it comes '
                         "(remove the key)")  # fmt: skip
    values.setdefault("max_message", chunk_size)
    return WebSocketConfig(**values, local_only=local_only, pty=pty)
