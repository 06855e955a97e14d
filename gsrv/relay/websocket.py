"""The WebSocket relay (`transport = "websocket"`): the child's bytes to and from frames
(relay/wsframes.py), over the plain connection or TLS, after the upgrade (edge/upgrade.py).

- text: a message per line each way (a newline appended to each message on its way in,
  stripped with a CR before it on its way out; output that is not UTF-8 closes with 1007, a
  line over max_message with 1009); binary: a byte stream, a message per chunk read.
- typed framing, with `pty = true` or `stderr = "websocket"`: each message's first character
  says what it is: from the client "i" input, "r" a resize ("r120x40": columns x rows); to it
  "o" output and "e" stderr. Without it a message is all data, as under websocketd.
- the child's end reaches the client as the close frame: 1000 after exit 0, 1011 with
  "exit=N" or "signal=NAME" otherwise (`nonzero_exit = "reset"`: no frame, a reset).
- a ping every ping_interval; no pong, no byte and no backpressure for ping_timeout after
  one ends the session as client_reset.
Memory stays bounded: frames are fed one read at a time and their payloads move as they
arrive (never a whole message), a text line waits for its end up to max_message.
"""

from __future__ import annotations

import contextlib
import socket as stdsocket
import termios
import time

import gevent
from gevent.event import Event
from gevent.socket import socket

from gsrv.config.web import WebSocketConfig
from gsrv.edge.refusal import reset
from gsrv.edge.tls import TlsStream
from gsrv.edge.upgrade import Upgraded
from gsrv.relay import kernel
from gsrv.relay.child import Child
from gsrv.relay.pump import Discard, End, FdSource, Meter, move, queued
from gsrv.relay.relays import LINGER_S, Closing, PipeRelay, RelayEvents, guarded
from gsrv.relay.terminal import Pipes, Terminal
from gsrv.relay.window import Window
from gsrv.relay.wsframes import Control, Data, FrameReader, Opcode, ProtocolError, close, frame

# After the upgrade, how each end that is not the child's own is told (code, and the reason's text).
CLOSE_CODES = {
    "idle_timeout": 1008, "session_timeout": 1008, "shutdown": 1001, "spawn_failed": 1011, "internal_error": 1011,
    "message_too_big": 1009, "invalid_text": 1007, "protocol_error": 1002,
}  # fmt: skip
CHILD_ENDS = ("eof", "child_exit", "hangup")
RESIZE_MAX = 32  # "r" + "COLSxROWS": anything longer is not a resize


def close_frame(closing: Closing) -> tuple[int, str]:
    """The close code and reason for how a session ended."""
    if closing.reason in CHILD_ENDS:
        if closing.signal is not None:  # (a hangup's own SIGHUP is no signal here: the session knows)
            return 1011, f"signal={closing.signal}"
        if closing.exit_code not in (0, None):
            return 1011, f"exit={closing.exit_code}"
        if closing.clean:
            return 1000, "exit=0" if closing.exit_code == 0 else closing.reason
    return CLOSE_CODES.get(closing.reason, 1011), closing.reason


class WebSocketRelay(PipeRelay):
    """Frames to and from the client over `stream`; the child's end is its pipes or its pty."""

    __slots__ = ("stream", "ws", "proto", "typed", "stderr_channel", "failure", "code", "out", "err", "pinged",
                 "pong", "ping_timed_out", "leftover", "frames", "reading_since", "errors", "err_done",
                 "window")  # fmt: skip

    def __init__(self, sock: socket, chunk: int, upgraded: Upgraded, ws: WebSocketConfig,
                 child_end: Pipes | Terminal, stderr_channel: bool) -> None:  # fmt: skip
        super().__init__(sock, chunk, child_end)
        self.stream, self.ws, self.leftover = upgraded.stream, ws, upgraded.leftover
        self.proto = FrameReader()
        self.stderr_channel = stderr_channel
        self.typed = stderr_channel or isinstance(child_end, Terminal)
        self.failure: str | None = None  # why a direction failed, when it is the protocol's business
        self.code = 0  # the close code that failure asks for
        self.out = Messages(self, "o")
        self.err = Messages(self, "e") if stderr_channel else None
        self.pinged = 0.0  # when the last ping went out (0: none waits for its pong)
        self.pong = Event()
        self.ping_timed_out = False
        self.frames: Frames | None = None  # the client's frames, one reader for the relay's life
        self.reading_since: float | None = None  # the input direction waits for the client since then
        self.errors = Meter()  # the child's stderr sent as "e" messages
        self.err_done = Event()  # the stderr channel reached its end (set now when there is none)
        self.window = Window(ws.reattach_buffer)  # output acknowledged by the client, when it does
        if not stderr_channel:
            self.err_done.set()

    @property
    def name(self) -> str:
        return "websocket+pty" if isinstance(self.child_end, Terminal) else "websocket"

    def log_fields(self) -> dict[str, object]:
        return super().log_fields() | {"bytes_err": self.errors.total if self.stderr_channel else None,
                                       "ping_timeout": 1 if self.ping_timed_out else None}  # fmt: skip

    def last_activity(self) -> float:
        return max(super().last_activity(), self.errors.last)

    def fail(self, reason: str, code: int) -> None:
        if self.failure is None:
            self.failure, self.code = reason, code

    def _failure(self, direction: str, end: End) -> str:
        return self.failure or super()._failure(direction, end)

    # -- running ------------------------------------------------------------------------

    def start(self, child: Child, events: RelayEvents) -> None:
        super().start(child, events)
        if self.err is not None and child.stderr >= 0:
            self.greenlets.append(gevent.spawn(guarded, self._stderr, child, events))
        else:
            self.err_done.set()
        if self.ws.ping_interval:
            self.greenlets.append(gevent.spawn(guarded, self._ping, child, events))

    def _in(self, child: Child) -> End:
        self.frames = Frames(self, child)
        return move(self.frames, self._child_sink(child), self.inbound, self.chunk)

    def _out(self, child: Child) -> End:
        """The output's end is stdout's and, with the stderr channel, stderr's: both go to the
        client, so the session is not done (nor its close frame sent) before both are."""
        end = move(self._child_source(child), self.out, self.outbound, self.chunk)
        if end is End.SOURCE_EOF:
            self.err_done.wait()
            if self.failure:
                return End.SINK_CLOSED  # the stderr channel failed: the session ends with its reason
        return end

    def _discard(self) -> End:
        return move(self.frames or Frames(self, None), Discard(), self.discarded, self.chunk)

    def _stderr(self, child: Child, events: RelayEvents) -> None:
        """The child's stderr as "e" messages; a line it cannot send ends the session."""
        assert self.err is not None
        try:
            end = move(FdSource(child.stderr, self.chunk), self.err, self.errors, self.chunk)
        finally:
            self.err_done.set()
        if end is End.SINK_CLOSED:
            events.abort(self.failure or "client_reset")

    def _ping(self, child: Child, events: RelayEvents) -> None:
        """A ping every ping_interval; dead when neither its pong nor any byte came back within
        ping_timeout while the input direction was waiting for the client all along (a child
        that does not read keeps gsrv from reading pongs too: that is backpressure, not death).
        After the client's close frame no pong can come: no more pings."""
        interval, timeout = self.ws.ping_interval, self.ws.ping_timeout
        while True:
            gevent.sleep(interval)
            if self.stream.closed or self.client_eof:
                return
            self.pong.clear()
            self.pinged = time.monotonic()
            try:
                self.stream.send(frame(Opcode.PING, b"gsrv"))
            except OSError:
                return  # the connection failed: the directions say so
            progress = self._progress()  # the ping may wait behind output the client reads slowly
            if self.pong.wait(timeout) or self.client_eof:
                continue
            waiting = self.reading_since
            if waiting is None or waiting > self.pinged or max(self.inbound.last, self.discarded.last) > self.pinged:
                continue
            if self._progress() > progress:
                continue  # the client took bytes meanwhile: a slow reader that has not reached the ping yet
            self.ping_timed_out = True
            events.abort("client_reset")
            return

    def _progress(self) -> int:
        """A count that grows while the client takes gsrv's bytes: TCP's acknowledged bytes (a
        client that stops reading closes its window, and the count stops); on a unix socket,
        the send queue, negated."""
        figures = kernel.figures_of(self.sock) if self.sock.family != stdsocket.AF_UNIX else None
        return figures.acked if figures is not None else -queued(self.sock.fileno(), termios.TIOCOUTQ)

    # -- the end ------------------------------------------------------------------------

    def close(self, closing: Closing) -> None:
        """A close frame for every end but a vanished client and `nonzero_exit = "reset"`: its
        code says whether the session finished, so the TCP close after it is a FIN. A reset
        when a frame was cut short (a direction stopped inside a send) or the close frame could
        not go out within LINGER_S."""
        framed = not (closing.reason == "client_reset" or closing.drop or self.stream.torn)
        if not (framed and self._close_frame(closing)):
            reset(self.sock)
            return
        super().close(Closing(closing.reason, True, closing.exit_code, closing.signal))

    def close_at_once(self, closing: Closing) -> None:
        """A session that never ran (its command could not start), from the accept loop, which
        must not wait: the close frame if the socket takes it now, then the close."""
        with contextlib.suppress(OSError):
            code, text = close_frame(closing)
            self.sock.setblocking(False)
            if not self.stream.torn and not isinstance(self.stream, TlsStream):
                self.sock.send(close(code, text))
            self.sock.shutdown(stdsocket.SHUT_WR)
        self.sock.close()

    def _close_frame(self, closing: Closing) -> bool:
        """What is left of the output's last line (after the child's own end), then the close
        frame (and TLS's close_notify); False if the client could not take them in time, or a
        frame was cut short."""
        try:
            with gevent.Timeout(LINGER_S, _Late):
                if closing.reason in CHILD_ENDS and closing.clean:
                    self.out.flush()
                    if self.err is not None:
                        self.err.flush()
                if self.stream.torn:
                    return False
                code, text = (self.code, self.failure) if self.failure and self.code else close_frame(closing)
                if not self.stream.closed:
                    self.stream.send(close(code, text))
                    self.stream.close_notify()
        except (OSError, _Late):
            return False
        return not self.stream.torn

    def _finish_output(self, closing: Closing) -> None:
        """The close frame went out already (close)."""


class _Late(Exception):
    """The close frame's time (LINGER_S) ran out: none of the OSErrors a send may raise."""


class Frames:
    """The client's frames as the child's bytes: data as it arrives (a frame's payload may be
    partial), control frames answered, the close frame as the end. In text mode a newline
    ends each message; with typed framing a message's first character says what it is."""

    __slots__ = ("relay", "child", "data", "message", "kind", "resize")

    def __init__(self, relay: WebSocketRelay, child: Child | None) -> None:
        self.relay, self.child = relay, child
        self.data = b""  # decoded payload not yet handed on (at most one read's worth)
        self.message = False  # inside a message
        self.kind = "i"
        self.resize = b""

    def read(self, limit: int) -> bytes:
        relay = self.relay
        while not self.data:
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
            relay.reading_since = time.monotonic()
            try:
                raw = relay.stream.recv(relay.chunk)
            finally:
                relay.reading_since = None
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
                relay.stream.send(frame(Opcode.PONG, event.payload))
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
        room, waited = relay.window.room(chunk, lambda: relay.inbound.holding)
        meter.blocked += waited
        return room

    def write(self, data: memoryview | bytes) -> float:
        relay = self.relay
        if relay.stream.closed:
            return 0.0
        if self.prefix == b"o":
            relay.window.sent += len(data)
        if relay.ws.messages == "binary":
            return relay.stream.send(frame(Opcode.BINARY, data, self.prefix))
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
        return relay.stream.send(frame(Opcode.TEXT, self.prefix + text.encode()))

    def close(self) -> None:
        pass
