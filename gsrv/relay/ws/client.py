"""A WebSocket session's client end: frames in (one read at a time), frames out in order (the
output in them counted by the window, offered to the watchers), and which connection it is now
(with reattach the Seat, relay/ws/reattach.py, decides: a connection lost without a close frame
detaches the session). relay/ws/messages.py talks to this object, never to the relay.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from gevent.event import Event

from gsrv.edge.hello import Declined, answer
from gsrv.edge.stream import Stream
from gsrv.edge.wsframes import Control, Data, FrameReader, Opcode, frame
from gsrv.relay.ws.reattach import Link, Seat
from gsrv.relay.ws.watchers import Watchers
from gsrv.relay.ws.window import Window


class Notes(Protocol):
    """What the client's end tells its session (relay/relays.py's RelayEvents has these)."""

    def note(self, event: str, **fields: object) -> None: ...
    def changed(self) -> None: ...


class WsClient:
    """One WebSocket client: its connection now, what came before its first frame, and how
    its frames go out."""

    __slots__ = ("stream", "reader", "leftover", "chunk", "window", "seat", "watchers", "notes", "reading_since",
                 "pong", "failure", "code")  # fmt: skip

    def __init__(self, stream: Stream, reader: FrameReader, leftover: bytes, chunk: int, window: Window,
                 seat: Seat | None = None, watchers: Watchers | None = None) -> None:  # fmt: skip
        self.stream, self.reader, self.leftover = stream, reader, leftover
        self.chunk, self.window, self.seat, self.watchers = chunk, window, seat, watchers
        self.notes: Notes | None = None  # the session, once it runs
        self.reading_since: float | None = None  # waiting for the client's bytes since then
        self.pong = Event()  # a pong (or any control frame but a close or ping) came
        self.failure: str | None = None  # why a direction failed, when it is the protocol's business
        self.code = 0  # the close code that failure asks for

    def fail(self, reason: str, code: int) -> None:
        """The first failure is the one the close frame names."""
        if self.failure is None:
            self.failure, self.code = reason, code

    @property
    def detached_since(self) -> float | None:
        return self.seat.detached_since if self.seat else None

    # -- in ---------------------------------------------------------------------------------

    def event(self) -> Data | Control | None:
        """The next frame event from the connection, reading it when none is buffered; None
        when the seat changed hands meanwhile (the caller's message state starts afresh).
        OSError: the connection ended without a close frame (the session's end, unless
        seated: then this waits for the next connection)."""
        while (event := self.reader.next()) is None:
            if not self._receive():
                return None
        return event

    def _receive(self) -> bool:
        """One read fed to the frame reader of the connection it came from; False: that
        connection was lost (or taken over while the read waited: what it brought is
        dropped, as a message it cut is) and a new one took its seat."""
        if self.leftover:  # frames the client sent with its upgrade request
            raw, self.leftover = self.leftover, b""
        else:
            stream = self.stream
            self.reading_since = time.monotonic()
            try:
                raw = stream.recv(self.chunk)
            except OSError:
                if not self.lost(stream):
                    raise
                raw = b""
            finally:
                self.reading_since = None
            if self.stream is not stream or (not raw and self.lost(stream)):
                assert self.seat is not None
                self.seat.attached.wait()  # detached: the next connection's frames, once it is seated
                return False
        if not raw:
            self.fail("client_reset", 0)  # a TCP end without a close frame: the client went away
            raise OSError("the connection ended without a close frame")
        self.reader.feed(raw)
        return True

    def answer_control(self, event: Control) -> bool:
        """A control frame: a ping answered, a pong noted; True for the client's close."""
        if event.opcode is Opcode.CLOSE:
            return True
        if event.opcode is Opcode.PING:
            self.send(frame(Opcode.PONG, event.payload))
        else:
            self.pong.set()
        return False

    # -- out --------------------------------------------------------------------------------

    def send(self, data: bytes, output: memoryview | bytes | None = None) -> float:
        """A frame to the client (`output`: the child's bytes in it, counted by the window).
        Seated: in order with a replay, and a connection found gone detaches instead of failing."""
        seat = self.seat
        if seat is None:
            self._counted(output)
            return self.stream.send(data)
        with seat.sending:
            self._counted(output)
            if seat.detached:
                return 0.0
            stream = self.stream
            try:
                return stream.send(data)
            except OSError:
                if not self.lost(stream):
                    raise
                return 0.0

    def _counted(self, output: memoryview | bytes | None) -> None:
        """Output on its way: the window counts (and keeps) it, each watcher gets it queued
        (no yield between the two: a new watcher's kept output and its live output meet)."""
        if output is not None:
            self.window.sending(output)
            if self.watchers is not None:
                self.watchers.offer(output)

    # -- which connection -------------------------------------------------------------------

    def lost(self, stream: Stream, why: str = "client_reset") -> bool:
        """The connection of `stream` ended without a close frame: True when the session goes
        on detached (reattach) instead of ending; its input then waits for the next connection."""
        seat = self.seat
        if seat is None or seat.ended:
            return False  # (at the session's end a failed send is the close's business)
        if seat.lost(stream, why) and self.notes is not None:
            self.notes.note("session_detached", why=why, kept=self.window.sent - self.window.base,
                            reattach_s=seat.reattach)  # fmt: skip
            self.notes.changed()
        return True

    def attach(self, link: Link, offset: int, taken: Callable[[Link], None]) -> None:
        """A reconnected page (from its hello, in its connection's prelude): the old connection
        closed (4409 if it still lived), the hello answered, the output from `offset` sent again,
        then the live stream; `taken(link)` as the link takes the seat, before anything yields.
        ProtocolError: an offset past what was sent."""
        seat, notes = self.seat, self.notes
        assert seat is not None and notes is not None
        if seat.ended:
            raise Declined("no_session", "the session is ending")
        start = self.window.resume(offset)
        took_over = not seat.detached
        seat.lost(self.stream, "taken_over")
        replayed = 0
        with seat.sending:
            seat.take(link)
            self.stream, self.reader, self.leftover = link.stream, link.reader, b""
            taken(link)
            try:
                link.stream.send(answer({"offset": start, "token": seat.token, "reattach": seat.reattach}))
                for piece in self.window.since(start):
                    link.stream.send(frame(Opcode.BINARY, piece, b"o"))
                    replayed += len(piece)
            except OSError:
                self.lost(link.stream)
        seat.ready()
        notes.note("session_reattached", conn=link.conn, peer=link.peer, offset=start, replayed=replayed,
                   took_over=1 if took_over else None)  # fmt: skip
        notes.changed()
