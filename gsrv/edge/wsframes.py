"""WebSocket frames (RFC 6455 §5) without I/O: a reader of a client's frames, fed one read at a
time, that hands a data frame's payload on as it arrives (unmasked in C, never a whole frame
or message held), and the server's own frames. The rules a client must keep are checked here:
masking, no extensions (RSV bits), control frames short and whole, continuation order,
UTF-8 in text messages, valid close codes.
"""

from __future__ import annotations

import codecs
import enum
import struct
from dataclasses import dataclass

from websockets.speedups import apply_mask

CONTROL_MAX = 125
LENGTH_MAX = 1 << 63


class Opcode(enum.IntEnum):
    CONTINUATION = 0
    TEXT = 1
    BINARY = 2
    CLOSE = 8
    PING = 9
    PONG = 10


class ProtocolError(Exception):
    """The client broke the protocol: `code` is the close code it gets (1002, 1007)."""

    def __init__(self, message: str, code: int = 1002) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Data:
    """A piece of a text or binary message's payload, in order; `last` ends the message."""

    payload: bytes
    text: bool
    last: bool


@dataclass(frozen=True)
class Control:
    """A whole ping, pong or close frame (a close's payload still encoded)."""

    opcode: Opcode
    payload: bytes


class FrameReader:
    """A client's frames, fed with `feed`; `next()` gives the next event or None (needs data)."""

    __slots__ = ("_buffer", "_opcode", "_fin", "_left", "_mask", "_offset", "_message", "_utf8")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._opcode: Opcode | None = None  # the frame being read (None: between frames)
        self._fin = False
        self._left = 0  # its payload bytes not yet handed on
        self._mask = b""
        self._offset = 0  # where in the mask the next payload byte is
        self._message: Opcode | None = None  # the data message in progress (for continuations)
        self._utf8: codecs.IncrementalDecoder | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer += data

    def next(self) -> Data | Control | None:
        if self._opcode is None and not self._header():
            return None
        opcode = self._opcode
        assert opcode is not None
        if opcode >= Opcode.CLOSE:  # a control frame: whole (it is at most 125 bytes)
            if len(self._buffer) < self._left:
                return None
            payload = self._take(self._left)
            self._opcode = None
            if opcode is Opcode.CLOSE:
                check_close(payload)
            return Control(opcode, payload)
        take = min(self._left, len(self._buffer))
        if take == 0 and self._left:
            return None
        payload = self._take(take)
        self._left -= take
        frame_done = self._left == 0
        last = frame_done and self._fin
        text = self._message is Opcode.TEXT
        if text and self._utf8 is not None:
            try:
                self._utf8.decode(payload, final=last)
            except UnicodeDecodeError as e:
                raise ProtocolError(f"a text message that is not UTF-8: {e.reason}", 1007) from None
        if frame_done:
            self._opcode = None
            if last:
                self._message = None
        return Data(payload, text, last)

    def _take(self, n: int) -> bytes:
        raw = bytes(self._buffer[:n])
        del self._buffer[:n]  # (a bytearray drops its head without moving the rest)
        if not n:
            return raw
        mask = self._mask if not self._offset else self._mask[self._offset :] + self._mask[: self._offset]
        self._offset = (self._offset + n) % 4
        return bytes(apply_mask(raw, mask))

    def _header(self) -> bool:
        """The next frame's header, checked; False until all of it is here."""
        buffer = self._buffer
        if len(buffer) < 2:
            return False
        first, second = buffer[0], buffer[1]
        if first & 0x70:
            raise ProtocolError("RSV bits set, and no extension was agreed")
        if not second & 0x80:
            raise ProtocolError("a client frame that is not masked")
        length, at = second & 0x7F, 2
        if length == 126:
            at = 4
        elif length == 127:
            at = 10
        if len(buffer) < at + 4:
            return False
        if length == 126:
            length = struct.unpack_from("!H", buffer, 2)[0]
        elif length == 127:
            length = struct.unpack_from("!Q", buffer, 2)[0]
            if length >= LENGTH_MAX:
                raise ProtocolError("a frame length with its top bit set")
        fin, code = bool(first & 0x80), first & 0x0F
        try:
            opcode = Opcode(code)
        except ValueError:
            raise ProtocolError(f"opcode {code} is not one RFC 6455 defines") from None
        if opcode >= Opcode.CLOSE:
            if not fin or length > CONTROL_MAX:
                raise ProtocolError("a control frame fragmented or over 125 bytes")
        elif opcode is Opcode.CONTINUATION:
            if self._message is None:
                raise ProtocolError("a continuation frame outside a message")
        else:
            if self._message is not None:
                raise ProtocolError("a new message inside a fragmented one")
            self._message = opcode
            self._utf8 = codecs.getincrementaldecoder("utf-8")() if opcode is Opcode.TEXT else None
        self._mask = bytes(buffer[at : at + 4])
        del buffer[: at + 4]
        self._opcode, self._fin, self._left, self._offset = opcode, fin, length, 0
        return True


def check_close(payload: bytes) -> None:
    """A close frame's payload: none, or a code a client may send and a UTF-8 reason."""
    if not payload:
        return
    if len(payload) == 1:
        raise ProtocolError("a close frame with a one-byte payload")
    code = struct.unpack_from("!H", payload)[0]
    if not (1000 <= code <= 1003 or 1007 <= code <= 1011 or 3000 <= code <= 4999):
        raise ProtocolError(f"close code {code} may not be sent")
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("a close reason that is not UTF-8", 1007) from None


def frame(opcode: Opcode, payload: bytes | bytearray | memoryview, prefix: bytes = b"") -> bytes:
    """A server frame (unmasked, whole), its payload `prefix` + payload (typed framing's type
    byte), copied once."""
    n = len(prefix) + len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return b"".join((head, prefix, payload))


def close(code: int, reason: str) -> bytes:
    """A close frame; the reason cut to fit in a control frame."""
    text = reason.encode()[: CONTROL_MAX - 2]
    return frame(Opcode.CLOSE, struct.pack("!H", code) + text.decode("utf-8", "ignore").encode())
