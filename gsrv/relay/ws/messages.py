"""A WebSocket session's messages (relay/ws/relay.py's two directions): the client's frames
as the child's input (`Frames`: data as it arrives, control frames answered, typed framing's
resizes and acknowledgements acted on), and the child's output as messages (`Messages`). Both
talk to the client's end (relay/ws/client.py), never to the relay.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from gsrv.config.web import WebSocketConfig
from gsrv.edge.wsframes import Control, Data, Opcode, ProtocolError, frame
from gsrv.relay.pump import Meter
from gsrv.relay.ws.client import WsClient

RESIZE_MAX = 32  # "r" + "COLSxROWS": anything longer is not a resize


class Frames:
    """The client's frames as the child's bytes: data as it arrives (a frame's payload may be
    partial), control frames answered, the close frame as the end (inside a message: a cut
    input, `message_cut`). In text mode a newline
    ends each message; with typed framing a message's first character says what it is.
    `resized(columns, rows)`: what a resize message does (None: nothing)."""

    __slots__ = ("client", "typed", "text", "resized", "data", "message", "kind", "resize", "reader")

    def __init__(self, client: WsClient, typed: bool, text: bool,
                 resized: Callable[[int, int], None] | None = None) -> None:  # fmt: skip
        self.client, self.typed, self.text, self.resized = client, typed, text, resized
        self.data = b""  # decoded payload not yet handed on (at most one read's worth)
        self.message = False  # inside a message
        self.kind = "i"
        self.resize = b""
        self.reader = client.reader  # the connection's frames these are (reattach: a new one starts afresh)

    def read(self, limit: int) -> bytes:
        client = self.client
        while not self.data:
            if client.reader is not self.reader:  # a new connection: a message cut by the old one's end is gone
                self.reader, self.message, self.kind, self.resize = client.reader, False, "i", b""
            try:
                event = client.event()
                if event is not None and self._event(event):
                    if self.message:  # a close frame inside a message: a cut input, never the input's end
                        client.fail("message_cut", 1000)
                        raise OSError("a close frame inside a message")
                    return b""
            except ProtocolError as e:
                client.fail("protocol_error", e.code)
                raise OSError(str(e)) from None
        data, self.data = self.data[:limit], self.data[limit:]
        return data

    def _event(self, event: Data | Control) -> bool:
        """One frame's event; True at the client's close frame."""
        if isinstance(event, Control):
            return self.client.answer_control(event)
        data, finished = event.payload, event.last
        if not self.message:
            self.message = True
            self.kind = "" if self.typed else "i"  # typed: the message's first byte, which may come later
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
                self.client.window.ack(text)
            elif self.kind == "i" and self.text:
                self.data += b"\n"
        return False

    def _resized(self) -> None:
        text, self.resize = self.resize.decode("ascii", "replace"), b""
        columns, _, rows = text.partition("x")
        if not (columns.isdigit() and rows.isdigit() and 0 < int(columns) < 65536 and 0 < int(rows) < 65536):
            raise ProtocolError(f'a resize must be "rCOLSxROWS" like "r120x40" (got "r{text}")', 1008)
        if self.resized is not None:
            self.resized(int(columns), int(rows))

    def done(self) -> None:
        pass

    def close(self) -> None:
        pass


class Messages:
    """The child's output (or stderr) as messages: one per chunk in binary mode; in text mode
    one per line, a line kept until its end up to max_message, and UTF-8 or nothing. With
    typed framing the channel ("o" output, "e" stderr) is each message's first character;
    output waits for the client's acknowledgements (the window) unless `stuck()` says its
    input waits behind a child that does not read (Window.room)."""

    __slots__ = ("client", "ws", "prefix", "stuck", "line")
    dropping = False

    def __init__(self, client: WsClient, ws: WebSocketConfig, channel: str, typed: bool,
                 stuck: Callable[[], bool] = lambda: False) -> None:  # fmt: skip
        self.client, self.ws, self.stuck = client, ws, stuck
        self.prefix = channel.encode() if typed else b""
        self.line = bytearray()

    def room(self, meter: Meter, chunk: int) -> int:
        if self.prefix != b"o":
            return chunk
        room, waited = self.client.window.room(chunk, self.stuck)
        meter.blocked += waited
        return room

    def write(self, data: memoryview | bytes) -> float:
        client = self.client
        if client.stream.closed:
            return 0.0
        if self.ws.messages == "binary":
            return client.send(frame(Opcode.BINARY, data, self.prefix), data if self.prefix == b"o" else None)
        if self.prefix == b"o":
            client.window.sending(data)
        self.line += data
        waited = 0.0
        while (end := self.line.find(b"\n")) >= 0:
            self._bounded(end)
            waited += self._send(bytes(self.line[:end]))
            del self.line[: end + 1]
        self._bounded(len(self.line))
        return waited

    def _bounded(self, length: int) -> None:
        limit = self.ws.max_message
        if length > limit + 1:  # (a CR before the newline is not the line's)
            self.client.fail("message_too_big", 1009)
            raise OSError(f"a line longer than max_message ({limit} bytes)")

    def flush(self) -> None:
        """The last line, if the output ended without a newline."""
        if self.line and not self.client.failure:
            line, self.line = bytes(self.line), bytearray()
            with contextlib.suppress(OSError):  # a failure is recorded: the close frame says it
                self._send(line)

    def _send(self, line: bytes) -> float:
        line = line[:-1] if line.endswith(b"\r") else line
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            self.client.fail("invalid_text", 1007)
            raise OSError(f"output that is not UTF-8 in text mode: {e}") from None
        return self.client.send(frame(Opcode.TEXT, self.prefix + text.encode()))

    def close(self) -> None:
        pass
