"""A service's `http` table (with `transport = "http"`): the path it answers, the methods,
the body's bound, how the child's output becomes the response, and keep-alive.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gsrv.config import keys
from gsrv.config.keys import key
from gsrv.config.table import Table
from gsrv.config.units import describe, format_size
from gsrv.config.web import _hosts, _path

METHOD = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP token
MAX_BODY_HIGH = 1 << 62


def _methods(t: Table, name: str, default: object) -> tuple[str, ...]:
    methods = t.strings(name, tuple(default) if isinstance(default, list) else ())
    for method in methods:
        if method == "*":
            continue
        if not METHOD.match(method) or method != method.upper():
            raise t.fail(name, f'must list HTTP methods in capitals like "GET", "POST", or "*" (got "{method}")')
        if method == "CONNECT":
            raise t.fail(name, "cannot allow CONNECT: it would turn the connection into a tunnel (always 405)")
    return tuple(methods)


def _content_type(t: Table, name: str, default: object) -> str:
    value = t.data.get(name, default)
    if not isinstance(value, str) or not re.match(r"^[\x21-\x7e][\x20-\x7e]*$", value) or "/" not in value:
        raise t.fail(name, f'must be a media type like "text/plain; charset=utf-8" (got {describe(value)})')
    return value


max_body_reader = keys.Reader(lambda t, name, default: t.size(name, default, 0, MAX_BODY_HIGH),
                              lambda n: format_size(n) if n else "none")  # fmt: skip


@dataclass(frozen=True)
class HttpConfig:
    """The keys of a service's `http` table."""

    path: str = key(_path, "/", "the URL path the service answers, at a segment boundary (the child's "
                    "SCRIPT_NAME; what follows is PATH_INFO); others get 404", shown=True)  # fmt: skip
    methods: tuple[str, ...] = key(_methods, ["*"], 'the request methods run ("*": any but CONNECT, which is '
                                   "always 405); another gets 405", shown=True)  # fmt: skip
    output: str = key(keys.choice("cgi", "nph", "body"), "cgi", '"cgi": the child writes a CGI header block '
                      '(Status, Content-Type, Location, ...), then the body | "nph": the whole response, status '
                      'line included | "body": no header block: 200 and content_type', shown=True)  # fmt: skip
    content_type: str = key(_content_type, "application/octet-stream", 'the response\'s Content-Type with output = '
                            '"body"', shown=True)  # fmt: skip
    max_body: int = key(max_body_reader, 0, "the longest request body (0 = no limit); a Content-Length over it "
                        "gets 413 before any child starts, a chunked body that crosses it ends the request",
                        shown=True)  # fmt: skip
    handshake_timeout: float = key(keys.duration(), "10s", "a request head must be complete this long after its "
                                   "first byte could be read; else 408", shown=True)  # fmt: skip
    between_requests: float = key(keys.duration("off"), "15s", "how long a kept-alive connection may wait for its "
                                  'next request (holding no slot and no child); "0s": no keep-alive',
                                  shown=True)  # fmt: skip
    max_requests: int = key(keys.integer(1), 1000, "requests on one connection; the last response says "
                            "Connection: close", shown=True)  # fmt: skip
    hosts: tuple[str, ...] = key(_hosts, [], "Host names answered besides loopback ones on a loopback listener "
                                 '(elsewhere, when set: only these); "*" = any; another Host gets 403',
                                 shown=True)  # fmt: skip
    local_only: bool = False  # derived: the service listens on loopback or a unix socket


def parse_http(t: Table, name: str, local_only: bool) -> HttpConfig:
    data: Any = t.data.get(name, {})
    if not isinstance(data, dict):
        raise t.fail(name, f'must be a table like {{ path = "/", output = "cgi" }} (got {describe(data)})')
    inner = Table(t.file, f"{t.name}.{name}", data, keys.names(HttpConfig))
    values = keys.read_all(inner, HttpConfig)
    if "content_type" in data and values["output"] != "body":
        raise inner.fail("content_type", f'applies only with output = "body" (output is "{values["output"]}": the '
                         "child names its own)")  # fmt: skip
    return HttpConfig(**values, local_only=local_only)
