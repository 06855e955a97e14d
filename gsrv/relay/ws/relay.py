"""The WebSocket relay (`transport = "websocket"`): the child's bytes to and from frames
(edge/wsframes.py), over the plain connection or TLS, after the upgrade (edge/upgrade.py).

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
import functools
import socket as stdsocket
import termios
import time

import gevent
from gevent.event import Event
from gevent.socket import socket

from gsrv.config.web import WebSocketConfig
from gsrv.edge.hello import Declined, Hello, answer
from gsrv.edge.refusal import reset
from gsrv.edge.tls import TlsStream
from gsrv.edge.upgrade import Upgraded
from gsrv.edge.wsframes import FrameReader, Opcode, close, frame
from gsrv.relay import kernel
from gsrv.relay.child import Child
from gsrv.relay.childend import Pipes, PtyEnd
from gsrv.relay.linger import LINGER_S
from gsrv.relay.pump import Discard, End, FdSource, Meter, move, queued
from gsrv.relay.relays import Closing, PipeRelay, RelayEvents, guarded
from gsrv.relay.ws.client import WsClient
from gsrv.relay.ws.messages import Frames, Messages
from gsrv.relay.ws.reattach import Link, Seat
from gsrv.relay.ws.watchers import Watchers
from gsrv.relay.ws.window import Window
from gsrv.workers import WORKERS

# After the upgrade, how each end that is not the child's own is told (code, and the reason's text).
CLOSE_CODES = {
    "idle_timeout": 1008, "session_timeout": 1008, "shutdown": 1001, "spawn_failed": 1011, "internal_error": 1011,
    "message_too_big": 1009, "invalid_text": 1007, "protocol_error": 1002, "message_cut": 1000,
}  # fmt: skip
CHILD_ENDS = ("eof", "child_exit", "hangup")


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
    """The child's bytes as messages to and from `client` (relay/ws/client.py: the client's end,
    frames and which connection); the child's end is its pipes or its pty."""

    __slots__ = ("client", "ws", "typed", "stderr_channel", "out", "err", "pinged", "ping_timed_out", "frames",
                 "errors", "err_done", "term", "child")  # fmt: skip

    def __init__(self, sock: socket, chunk: int, upgraded: Upgraded, ws: WebSocketConfig,
                 child_end: Pipes | PtyEnd, stderr_channel: bool) -> None:  # fmt: skip
        super().__init__(sock, chunk, child_end)
        self.ws, self.stderr_channel = ws, stderr_channel
        self.typed = stderr_channel or isinstance(child_end, PtyEnd)
        self.term = upgraded.term  # the terminal page's protocol (edge/hello.py): its hello answered first
        reader = upgraded.reader or FrameReader()
        window = Window(ws.reattach_buffer)  # output acknowledged by the client, when it does
        seat = Seat(Link(sock, upgraded.stream, reader), ws.reattach) if self.term and ws.reattach else None
        share = ws.share if self.term else "off"
        watchers = Watchers(share, ws.reattach_buffer, self._note) if share != "off" else None
        if seat is not None or watchers is not None:
            window.keep()  # (for a reattach, for a new watcher)
        elif self.term:
            window.on = True  # the page acknowledges what it rendered
        self.client = WsClient(upgraded.stream, reader, upgraded.leftover, chunk, window, seat, watchers)
        self.out = Messages(self.client, ws, "o", self.typed, self._stuck)
        self.err = Messages(self.client, ws, "e", self.typed) if stderr_channel else None
        self.pinged = 0.0  # when the last ping went out (0: none waits for its pong)
        self.ping_timed_out = False
        self.frames: Frames | None = None  # the client's frames, one reader for the relay's life
        self.errors = Meter()  # the child's stderr sent as "e" messages
        self.err_done = Event()  # the stderr channel reached its end (set now when there is none)
        self.child: Child | None = None
        if not stderr_channel:
            self.err_done.set()

    @property
    def seat(self) -> Seat | None:
        """Which connection the client is now (reattach); None: the first, for the session's life."""
        return self.client.seat

    @property
    def watchers(self) -> Watchers | None:
        return self.client.watchers

    @property
    def name(self) -> str:
        return "websocket+pty" if isinstance(self.child_end, PtyEnd) else "websocket"

    def log_fields(self) -> dict[str, object]:
        return super().log_fields() | {"bytes_err": self.errors.total if self.stderr_channel else None,
                                       "ping_timeout": 1 if self.ping_timed_out else None,
                                       "drops": self.seat.drops if self.seat else None,
                                       "watchers": self.watchers.joined if self.watchers else None}  # fmt: skip

    @property
    def tokens(self) -> tuple[str, ...]:
        """The tokens a hello may name this session by: its own (reattach), its watchers' (share)."""
        return tuple(t.token for t in (self.seat, self.watchers) if t is not None)

    @property
    def detached_since(self) -> float | None:
        return self.client.detached_since

    def peer_is_dead(self) -> bool:
        """The watchdog's check; a seated session's dead peer detaches it instead."""
        seat = self.seat
        if seat is None:
            return super().peer_is_dead()
        if not seat.detached and super().peer_is_dead():
            self.client.lost(self.client.stream)
        return False

    def last_activity(self) -> float:
        return max(super().last_activity(), self.errors.last)

    def _failure(self, direction: str, end: End) -> str:
        return self.client.failure or super()._failure(direction, end)

    def _stuck(self) -> bool:
        """The client's input waits behind a child that does not read (the window does not hold)."""
        return self.inbound.holding and not self.client.detached_since

    # -- running ------------------------------------------------------------------------

    def start(self, child: Child, events: RelayEvents) -> None:
        self.client.notes, self.child = events, child
        if self.term:  # the hello's answer before any output
            seat, watchers = self.seat, self.watchers
            fields: dict[str, object] = {"offset": 0}
            if seat is not None:
                fields |= {"token": seat.token, "reattach": seat.reattach}
            if watchers is not None:
                fields |= {"watch": watchers.token, "share": watchers.share}
            with contextlib.suppress(OSError):  # (a failed send: the directions find out)
                self.client.send(answer(fields))
        super().start(child, events)
        if self.err is not None and child.stderr >= 0:
            self.tasks.append(WORKERS.start(guarded, self._stderr, child, events))
        else:
            self.err_done.set()
        if self.ws.ping_interval:
            self.tasks.append(WORKERS.start(guarded, self._ping, child, events))

    def _in(self, child: Child) -> End:
        resized = functools.partial(self._resized, child)
        self.frames = Frames(self.client, self.typed, self.ws.messages == "text", resized)
        return move(self.frames, self._child_sink(child), self.inbound, self.chunk)

    def _out(self, child: Child) -> End:
        """The output's end is stdout's and, with the stderr channel, stderr's: both go to the
        client, so the session is not done (nor its close frame sent) before both are."""
        end = move(self._child_source(child), self.out, self.outbound, self.chunk)
        if end is End.SOURCE_EOF:
            self.err_done.wait()
            if self.client.failure:
                return End.SINK_CLOSED  # the stderr channel failed: the session ends with its reason
        return end

    def stop(self) -> None:
        if self.seat is not None:
            self.seat.ended = True
        super().stop()

    def _discard(self) -> End:
        frames = self.frames or Frames(self.client, self.typed, self.ws.messages == "text",
                                       functools.partial(self._resized, None))  # fmt: skip
        return move(frames, Discard(), self.discarded, self.chunk)

    def _resized(self, child: Child | None, columns: int, rows: int) -> None:
        """A resize message: the child's terminal (while its input runs), and the recording's."""
        if child is not None:
            self.child_end.resize(child, columns, rows)
        if self.recording is not None:
            self.recording.resize(columns, rows)

    def _stderr(self, child: Child, events: RelayEvents) -> None:
        """The child's stderr as "e" messages; a line it cannot send ends the session."""
        assert self.err is not None
        try:
            end = move(FdSource(child.stderr, self.chunk), self.err, self.errors, self.chunk)
        finally:
            self.err_done.set()
        if end is End.SINK_CLOSED:
            events.abort(self.client.failure or "client_reset")

    def _ping(self, child: Child, events: RelayEvents) -> None:
        """A ping every ping_interval; dead when neither its pong nor any byte came back within
        ping_timeout while the input direction was waiting for the client all along (a child
        that does not read keeps gsrv from reading pongs too: that is backpressure, not death).
        After the client's close frame no pong can come: no more pings."""
        interval, timeout, client = self.ws.ping_interval, self.ws.ping_timeout, self.client
        while True:
            gevent.sleep(interval)
            if client.stream.closed or self.client_eof:
                return
            if client.seat is not None and client.seat.detached:
                continue
            client.pong.clear()
            self.pinged = time.monotonic()
            try:
                client.send(frame(Opcode.PING, b"gsrv"))
            except OSError:
                return  # the connection failed: the directions say so
            progress = self._progress()  # the ping may wait behind output the client reads slowly
            if client.pong.wait(timeout) or self.client_eof:
                continue
            waiting = client.reading_since
            if waiting is None or waiting > self.pinged or max(self.inbound.last, self.discarded.last) > self.pinged:
                continue
            if self._progress() > progress:
                continue  # the client took bytes meanwhile: a slow reader that has not reached the ping yet
            self.ping_timed_out = True
            if client.seat is None:
                events.abort("client_reset")
                return
            client.lost(client.stream, "ping_timeout")

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
        if self.watchers is not None:
            self.watchers.close(*self._close_code(closing))
        if self.seat is not None:
            self.seat.finish()
            if self.seat.detached:
                return  # its last connection is closed already
        framed = not (closing.reason == "client_reset" or closing.drop or self.client.stream.torn)
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
            stream = self.client.stream
            if not stream.torn and not isinstance(stream, TlsStream):
                self.sock.send(close(code, text))
            self.sock.shutdown(stdsocket.SHUT_WR)
        self.sock.close()

    def _close_frame(self, closing: Closing) -> bool:
        """What is left of the output's last line (after the child's own end), then the close
        frame (and TLS's close_notify); False if the client could not take them in time, or a
        frame was cut short."""
        client = self.client
        try:
            with gevent.Timeout(LINGER_S, _Late):
                if closing.reason in CHILD_ENDS and closing.clean:
                    self.out.flush()
                    if self.err is not None:
                        self.err.flush()
                if client.stream.torn:
                    return False
                code, text = self._close_code(closing)
                if not client.stream.closed:
                    client.send(close(code, text))
                    client.stream.close_notify()
        except (OSError, _Late):
            return False
        return not client.stream.torn

    def _close_code(self, closing: Closing) -> tuple[int, str]:
        client = self.client
        return (client.code, client.failure) if client.failure and client.code else close_frame(closing)

    def _finish_output(self, closing: Closing) -> None:
        """The close frame went out already (close)."""

    # -- the client's connection: one, or with reattach, one at a time (relay/ws/client.py) ----

    def join(self, link: Link, hello: Hello, same_user: bool) -> None:
        """A terminal page's hello that names this session (the service found it by the token):
        its own token, a reattach by the same user (the page takes the session); its watch
        token, a watcher. Raises Declined."""
        if hello.resume is None:
            if self.watchers is None or hello.watch != self.watchers.token:
                raise Declined("no_session", "that token is no session's watch token")
            self.watch(link)
            return
        if self.seat is None or hello.resume != self.seat.token:
            raise Declined("no_session", "that token is no session's own (a watch token watches)")
        if not same_user:
            raise Declined("wrong_user", "the session is another user's")
        self.attach(link, hello.offset)

    def attach(self, link: Link, offset: int) -> None:
        """A reconnected page takes the session (WsClient.attach); its socket is the relay's then."""
        self.client.attach(link, offset, self._taken)

    def _taken(self, link: Link) -> None:
        self.sock = link.sock

    def watch(self, link: Link) -> None:
        """A watcher (share, from its hello, in its connection's prelude): its answer and the
        kept output queued before any live output (nothing yields in between), then a resize
        nudge so a full-screen program redraws."""
        watchers, window, child = self.client.watchers, self.client.window, self.child
        if watchers is None or child is None or (self.seat is not None and self.seat.ended):
            raise Declined("no_session", "the session is ending")
        first = [answer({"offset": window.base, "share": watchers.share})]
        first += [frame(Opcode.BINARY, piece, b"o") for piece in window.since(window.base)]
        watchers.join(link, first, lambda data: self.child_end.type(child, data))
        self.child_end.nudge(child)

    def _note(self, event: str, **fields: object) -> None:
        if self.client.notes is not None:
            self.client.notes.note(event, **fields)


class _Late(Exception):
    """The close frame's time (LINGER_S) ran out: none of the OSErrors a send may raise."""
