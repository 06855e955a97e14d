"""A CGI child's response, without I/O: its header block (RFC 3875 §6: Status, Content-Type,
Location, other fields) parsed into a response head, the head gsrv writes for it, and the
status gsrv answers with when the child gave none (its end, or a session's end, first).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from email.utils import formatdate
from http import HTTPStatus

MAX_BLOCK = 16 * 1024  # the child's header block: more is a 502
FIELD_NAME = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
FIELD_VALUE = re.compile(rb"^[\t\x20-\x7e\x80-\xff]*$")
# Fields a child cannot set: the connection's framing and persistence are gsrv's.
GSRV_OWNS = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
                       b"proxy-connection"})  # fmt: skip
EXIT_FIELD = "Gsrv-Exit"  # the child's exit: a header on gsrv's own error answers, a trailer after a chunked body
SIGNAL_FIELD = "Gsrv-Signal"
# A session that ended before the child's head went out: the status the client gets.
STATUS_FOR = {"idle_timeout": 504, "session_timeout": 504, "shutdown": 503, "spawn_failed": 502,
              "internal_error": 500, "body_too_large": 413}  # fmt: skip


@dataclass(frozen=True)
class Failure:
    """Why a side of the exchange broke its framing: the end's reason and what the log says."""

    reason: str
    error: str


class Broken(OSError):
    """A writer or a body reader broke a rule; its `failure` says which (the direction stops)."""


class BadHead(Exception):  # noqa: N818 (the child's fault, answered 502)
    """The child's header block is not one gsrv can answer with."""


@dataclass(frozen=True)
class Head:
    status: int
    reason: str
    fields: tuple[tuple[bytes, bytes], ...]  # as the child wrote them (Status removed)
    length: int | None  # its Content-Length


def with_length(head: Head, length: int) -> Head:
    """The head of a body whose whole length gsrv knows (the child's output ended already)."""
    return replace(head, fields=(*head.fields, (b"Content-Length", b"%d" % length)), length=length)


def block_end(buffer: bytes | bytearray) -> int:
    """Where the header block ends (after its empty line, CRLF or LF), 0 if not yet."""
    start = 0
    while True:
        newline = buffer.find(b"\n", start)
        if newline < 0:
            return 0
        if newline == start or (newline == start + 1 and buffer[start : start + 1] == b"\r"):
            return newline + 1
        start = newline + 1


def parse_block(block: bytes) -> Head:
    """The header block (ending in its empty line). Raises BadHead: a line that is no field,
    none of Content-Type, Location and Status, a Status of 1xx or out of range, an unusable
    Content-Length."""
    fields: list[tuple[bytes, bytes]] = []
    status: int | None = None
    reason = ""
    named: set[bytes] = set()
    for raw in block.split(b"\n")[:-2]:
        line = raw[:-1] if raw.endswith(b"\r") else raw
        name, colon, value = line.partition(b":")
        value = value.strip(b" \t")
        if not colon or not FIELD_NAME.match(name) or not FIELD_VALUE.match(value):
            raise BadHead(f"not a header field: {line[:80]!r}")
        key = name.lower()
        named.add(key)
        if key == b"status":
            code, _, text = value.partition(b" ")
            if len(code) != 3 or not code.isdigit() or not 200 <= int(code) <= 599:
                raise BadHead(f"Status {value[:40]!r}: a 3-digit status 200..599 is needed")
            status, reason = int(code), text.decode("latin-1").strip()
        elif key not in GSRV_OWNS:
            fields.append((name, value))
    if not named & {b"status", b"content-type", b"location"}:
        raise BadHead("no Content-Type, Location or Status in the header block")
    lengths = {value for name, value in fields if name.lower() == b"content-length"}
    if len(lengths) > 1 or lengths and not next(iter(lengths)).isdigit():
        raise BadHead(f"Content-Length {b', '.join(sorted(lengths))!r} is not one number")
    if status is None:
        status = 302 if b"location" in named else 200
    return Head(status, reason or phrase(status), tuple(fields),
                int(next(iter(lengths))) if lengths else None)  # fmt: skip


def phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def head_bytes(version: str, head: Head, framing: str, close: bool, trailer: bool) -> bytes:
    """The response head gsrv writes: the child's fields, Date, and gsrv's framing
    ("length": the child's Content-Length, "chunked", "close": until the connection ends)."""
    lines = [f"HTTP/{version} {head.status} {head.reason}".encode("latin-1")]
    lines += [name + b": " + value for name, value in head.fields if framing == "length" or
              name.lower() != b"content-length"]  # fmt: skip
    if not any(name.lower() == b"date" for name, _ in head.fields):
        lines.append(b"Date: " + http_date().encode())
    if framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        if trailer:
            lines.append(f"Trailer: {EXIT_FIELD}".encode())
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


_date: tuple[int, str] = (0, "")


def http_date() -> str:
    """The Date field's value, made once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, formatdate(now, usegmt=True))
    return _date[1]


Fields = tuple[tuple[str, str], ...]


def failure_status(reason: str, exit_code: int | None, signal: str | None) -> tuple[int, str, Fields]:
    """What the client gets when the session ended before a response head went out: the
    status, its text, and the child's end as fields (Gsrv-Exit, Gsrv-Signal)."""
    fields: list[tuple[str, str]] = []
    if exit_code is not None:
        fields.append((EXIT_FIELD, str(exit_code)))
    if signal is not None:
        fields.append((SIGNAL_FIELD, signal))
    status = STATUS_FOR.get(reason, 502)
    if status == 502:
        text = (f"the command was killed by SIG{signal} before its response head" if signal else
                f"the command exited {exit_code} before its response head" if exit_code not in (None, 0) else
                "the command gave no valid response head")  # fmt: skip
    else:
        text = f"the request ended ({reason}) before a response"
    return status, text, tuple(fields)
