"""A WebSocket session's messages (relay/websocket.py's two directions): the client's frames
as the child's input (`Frames`: data as it arrives, control frames answered, typed framing's
resizes and acknowledgements acted on), and the child's output as messages (`Messages`).
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

from gsrv.edge.wsframes import Control, Data, Opcode, ProtocolError, frame
from gsrv.relay.child import Child
from gsrv.relay.pump import Meter

if TYPE_CHECKING:
    from gsrv.relay.websocket import WebSocketRelay

RESIZE_MAX = 32  # "r" + "COLSxROWS": anything longer is not a resize


class Frames:
    """The client's frames as the child's bytes: data as it arrives (a frame's payload may be
    partial), control frames answered, the close frame as the end. In text mode a newline
    ends each message; with typed framing a message's first character says what it is."""

    __slots__ = ("relay", "child", "data", "message", "kind", "resize", "reader")

    def __init__(self, relay: WebSocketRelay, child: Child | None) -> None:
        self.relay, self.child = relay, child
        self.data = b""  # decoded payload not yet handed on (at most one read's worth)
        self.message = False  # inside a message
        self.kind = "i"
        self.resize = b""
        self.reader = relay.proto  # the connection's frames these are (reattach: a new one starts afresh)

    def read(self, limit: int) -> bytes:
        relay = self.relay
        while not self.data:
            if relay.proto is not self.reader:  # a new connection: a message cut by the old one's end is gone
                self.reader, self.message, self.kind, self.resize = relay.proto, False, "i", b""
            try:
                event = relay.proto.next()
                if event is None:
                    self._feed()
                elif self._event(event):
                    return b""
            except ProtocolError as e:
                relay.fail("protocol_error", e.code)
                raise OSError(str(e)) from None
        data, self.data = self.data[:limit], self.data[limit:]
        return data

    def _feed(self) -> None:
        relay = self.relay
        if relay.leftover:  # frames the client sent with its upgrade request
            raw, relay.leftover = relay.leftover, b""
        else:
            stream = relay.stream
            relay.reading_since = time.monotonic()
            try:
                raw = stream.recv(relay.chunk)
            except OSError:
                if not relay.lost(stream):
                    raise
                raw = b""
            finally:
                relay.reading_since = None
            if not raw and relay.lost(stream):
                assert relay.seat is not None
                relay.seat.attached.wait()  # detached: the next connection's frames
                return
        if not raw:
            relay.fail("client_reset", 0)  # a TCP end without a close frame: the client went away
            raise OSError("the connection ended without a close frame")
        relay.proto.feed(raw)

    def _event(self, event: Data | Control) -> bool:
        """One frame's event; True at the client's close frame."""
        relay = self.relay
        if isinstance(event, Control):
            if event.opcode is Opcode.CLOSE:
                return True
            if event.opcode is Opcode.PING:
                relay.send(frame(Opcode.PONG, event.payload))
            else:
                relay.pong.set()
            return False
        data, finished = event.payload, event.last
        if not self.message:
            self.message = True
            self.kind = "" if relay.typed else "i"  # typed: the message's first byte, which may come later
        if not self.kind and data:
            self.kind, data = chr(data[0]), data[1:]
            if self.kind not in "ira":
                raise ProtocolError(f'unknown message type "{self.kind}" (typed framing: "i" input, "r" resize, '
                                    '"a" acknowledged output)', 1003)  # fmt: skip
        if self.kind in "ra":
            self.resize += data  # a control message's payload, whole before it acts
            if len(self.resize) > RESIZE_MAX:
                raise ProtocolError("a resize or acknowledgement longer than its digits", 1008)
        elif self.kind == "i":
            self.data += data
        if finished:
            self.message = False
            if self.kind == "r":
                self._resized()
            elif self.kind == "a":
                text, self.resize = self.resize, b""
                relay.window.ack(text)
            elif self.kind == "i" and relay.ws.messages == "text":
                self.data += b"\n"
        return False

    def _resized(self) -> None:
        text, self.resize = self.resize.decode("ascii", "replace"), b""
        columns, _, rows = text.partition("x")
        if not (columns.isdigit() and rows.isdigit() and 0 < int(columns) < 65536 and 0 < int(rows) < 65536):
            raise ProtocolError(f'a resize must be "rCOLSxROWS" like "r120x40" (got "r{text}")', 1008)
        if self.child is not None:
            self.relay.child_end.resize(self.child, int(columns), int(rows))
        if self.relay.recording is not None:
            self.relay.recording.resize(int(columns), int(rows))

    def done(self) -> None:
        pass

    def close(self) -> None:
        pass


class Messages:
    """The child's output (or stderr) as messages: one per chunk in binary mode; in text mode
    one per line, a line kept until its end up to max_message, and UTF-8 or nothing."""

    __slots__ = ("relay", "prefix", "line")
    dropping = False

    def __init__(self, relay: WebSocketRelay, channel: str) -> None:
        self.relay = relay
        self.prefix = channel.encode() if relay.typed else b""
        self.line = bytearray()

    def room(self, meter: Meter, chunk: int) -> int:
        if self.prefix != b"o":
            return chunk
        relay = self.relay
        room, waited = relay.window.room(chunk, lambda: relay.inbound.holding and not relay.detached_since)
        meter.blocked += waited
        return room

    def write(self, data: memoryview | bytes) -> float:
        relay = self.relay
        if relay.stream.closed:
            return 0.0
        if relay.ws.messages == "binary":
            return relay.send(frame(Opcode.BINARY, data, self.prefix), data if self.prefix == b"o" else None)
        if self.prefix == b"o":
            relay.window.sending(data)
        self.line += data
        waited = 0.0
        while (end := self.line.find(b"\n")) >= 0:
            self._bounded(end)
            waited += self._send(bytes(self.line[:end]))
            del self.line[: end + 1]
        self._bounded(len(self.line))
        return waited

    def _bounded(self, length: int) -> None:
        limit = self.relay.ws.max_message
        if length > limit + 1:  # (a CR before the newline is not the line's)
            self.relay.fail("message_too_big", 1009)
            raise OSError(f"a line longer than max_message ({limit} bytes)")

    def flush(self) -> None:
        """The last line, if the output ended without a newline."""
        if self.line and not self.relay.failure:
            line, self.line = bytes(self.line), bytearray()
            with contextlib.suppress(OSError):  # a failure is recorded: the close frame says it
                self._send(line)

    def _send(self, line: bytes) -> float:
        relay = self.relay
        line = line[:-1] if line.endswith(b"\r") else line
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            relay.fail("invalid_text", 1007)
            raise OSError(f"output that is not UTF-8 in text mode: {e}") from None
        return relay.send(frame(Opcode.TEXT, self.prefix + text.encode()))

    def close(self) -> None:
        pass
