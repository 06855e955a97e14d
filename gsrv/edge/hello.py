"""The terminal page's protocol, `gsrv-term` (a WebSocket subprotocol the page asks for, on a
service with pty = true): before any child starts, the page's first message says who it is
and what it wants, and gsrv's first message answers it. Sans-I/O but for `read_hello`.

- the hello, "h" + a JSON object: {} for a new session; "bearer": a token for `auth = { bearer
  = FILE }` (a browser cannot set Authorization on a WebSocket); "resume": a session's token
  and "offset": the output bytes the page has (it reattaches instead of starting a child);
  "watch": a session's watch token (it watches the session: share).
- gsrv's answer, "h" + a JSON object: "offset" (where the output in the "o" messages that
  follow continues from: 0 for a new session), with reattach "token" and "reattach" (seconds),
  with share "watch" (to a watcher: "share", its mode). Tokens are 128 random bits, sent only
  here, never logged.
- a hello gsrv refuses ends with a close code of gsrv's own (CLOSE_CODES, 4000-4999).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from gsrv.edge.stream import Stream
from gsrv.edge.wsframes import Control, FrameReader, Opcode, ProtocolError, frame
from gsrv.errors import GsrvError

SUBPROTOCOL = "gsrv-term"
HELLO_MAX = 4096  # a hello's payload, the type byte included
TOKEN_BYTES = 16  # 128 bits
# gsrv's own close codes (the page shows them; README lists them), by the reason in the log.
CLOSE_CODES = {
    "unauthorized": 4401,  # no valid bearer token in the hello
    "wrong_user": 4403,  # a session's token from another user than the session's
    "no_session": 4404,  # a token no session here has (wrong, expired, or its session ended)
    "taken_over": 4409,  # a new connection with the session's token took it over
    "auth_limited": 4429,  # over failures_per_minute from this address
    "auth_busy": 4429,  # no password verification slot before the handshake's deadline
    "fell_behind": 4413,  # a watcher whose queue (reattach_buffer) filled: it reads slower than the output comes
}


class Declined(GsrvError):
    """A hello gsrv will not follow: `reason` for the log, its close code, what to say."""

    def __init__(self, reason: str, error: str) -> None:
        super().__init__(error)
        self.reason, self.code = reason, CLOSE_CODES[reason]


@dataclass(frozen=True)
class Hello:
    bearer: str | None = None
    resume: str | None = None  # a session's token: reattach to it
    offset: int = 0  # with resume: the output bytes the page has
    watch: str | None = None  # a session's watch token (share): watch it


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def parse_hello(message: bytes) -> Hello:
    """A whole hello message (its "h" included); ProtocolError (1008) when it is not one."""
    if not message.startswith(b"h"):
        raise ProtocolError('the gsrv-term protocol starts with a hello: "h" and a JSON object', 1008)
    try:
        fields = json.loads(message[1:] or b"{}")
    except (ValueError, RecursionError):  # not JSON, not UTF-8 (a ValueError), nested too deep
        raise ProtocolError("a hello that is not a JSON object", 1008) from None
    if not isinstance(fields, dict):
        raise ProtocolError("a hello that is not a JSON object", 1008)
    bearer, resume, offset, watch = (fields.get(name) for name in ("bearer", "resume", "offset", "watch"))
    if not all(value is None or isinstance(value, str) for value in (bearer, resume, watch)):
        raise ProtocolError('a hello\'s "bearer", "resume" and "watch" are strings', 1008)
    offset = 0 if offset is None else offset
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ProtocolError('a hello\'s "offset" is a byte count', 1008)
    return Hello(bearer, resume, offset, watch)


def answer(fields: dict[str, object]) -> bytes:
    """gsrv's answer to a hello, as a binary frame."""
    return frame(Opcode.BINARY, json.dumps(fields, separators=(",", ":")).encode(), b"h")


def read_hello(stream: Stream, reader: FrameReader, leftover: bytes) -> Hello:
    """The client's first message (after `leftover`, what came with the upgrade), its pings
    answered meanwhile; the reader keeps what follows it. ProtocolError: not a hello, a close
    frame first, or the connection's end."""
    message = bytearray()
    reader.feed(leftover)
    while True:
        event = reader.next()
        if event is None:
            raw = stream.recv(HELLO_MAX)
            if not raw:
                raise ProtocolError("the connection ended before the hello")
            reader.feed(raw)
            continue
        if isinstance(event, Control):
            if event.opcode is Opcode.CLOSE:
                raise ProtocolError("a close frame instead of the hello", 1000)
            if event.opcode is Opcode.PING:
                stream.send(frame(Opcode.PONG, event.payload))
            continue
        message += event.payload
        if len(message) > HELLO_MAX:
            raise ProtocolError(f"a hello over {HELLO_MAX} bytes", 1009)
        if event.last:
            return parse_hello(bytes(message))
