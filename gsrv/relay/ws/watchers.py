"""Watchers of a terminal page's session (`share = "read-only" | "read-write"`, with the page's
gsrv-term protocol, edge/hello.py): the driver's answer carries a watch token; a connection
whose hello names it sees the session's output live, the kept output first (the window's, up to
reattach_buffer) and then a resize nudge so a full-screen program redraws; with read-write its
typing reaches the terminal too, with read-only it reaches nothing. Its resizes and
acknowledgements are the driver's business: ignored.

A watcher never slows the driver or the child: the output is offered to each watcher's own
queue (relay/outbox.py), at most `limit` bytes; one whose queue is full is closed with 4413
(fell_behind). Each watcher runs two greenlets of its own (its outbox's sender, its reader),
ended with the session.
"""

from __future__ import annotations

import contextlib
import socket as stdsocket
import time
from collections.abc import Callable

import gevent

from gsrv.edge.hello import CLOSE_CODES, new_token
from gsrv.edge.refusal import reset
from gsrv.edge.wsframes import Control, Opcode, ProtocolError, close, frame
from gsrv.relay.outbox import Outbox
from gsrv.relay.ws.reattach import Link

LINGER_S = 2.0  # at the session's end: how long a watcher's queue and close frame may take to go out
READ_CHUNK = 65536  # a watcher's frames: bytes a read asks for

Note = Callable[..., None]  # a log line of the session's: note(event, **fields)


class Watcher:
    """One watcher's connection: its frames queued in an Outbox (relay/outbox.py, the bounded
    per-client queue any transport's shared session uses) and a reader greenlet of its own."""

    __slots__ = ("link", "typing", "outbox", "reader", "why", "joined", "note")

    def __init__(self, link: Link, typing: Callable[[bytes], None] | None, limit: int, first: list[bytes],
                 note: Note) -> None:  # fmt: skip
        self.link, self.typing, self.note = link, typing, note
        self.why: str | None = None  # why it ended, once it has
        self.joined = time.monotonic()
        self.outbox = Outbox(link.stream.send, limit, lambda: self.end("client_reset"), first)
        self.reader = gevent.spawn(self._read)

    def offer(self, data: memoryview | bytes) -> bool:
        """The session's output; False when the queue has no room for it (fell behind)."""
        return self.outbox.offer(frame(Opcode.BINARY, data, b"o"))

    def _read(self) -> None:
        """Its frames: pings answered, "i" messages typed (read-write) or dropped, the close
        frame or the connection's end ends it."""
        reader, stream = self.link.reader, self.link.stream
        kind: int | None = None  # the message in progress: its type byte
        try:
            while True:
                event = reader.next()
                if event is None:
                    raw = stream.recv(READ_CHUNK)
                    if not raw:
                        break
                    reader.feed(raw)
                elif isinstance(event, Control):
                    if event.opcode is Opcode.CLOSE:
                        self.end("closed", 1000)
                        return
                    if event.opcode is Opcode.PING:
                        self.outbox.put(frame(Opcode.PONG, event.payload))
                else:
                    data = event.payload
                    if kind is None and data:
                        kind, data = data[0], data[1:]
                    if kind == ord("i") and self.typing is not None and data:
                        self.typing(data)
                    if event.last:
                        kind = None
        except ProtocolError as e:
            self.end("protocol_error", e.code)
            return
        except OSError:
            pass
        self.end("client_reset")

    def end(self, why: str, code: int = 0, drop: bool = True, text: str = "") -> None:
        """Once: its line, then (with `code`) its close frame after the frame in progress (the
        rest of the queue dropped, unless not `drop`), up to LINGER_S, then the connection
        closed; a reset when the close frame could not go out."""
        if self.why is not None:
            return
        self.why = why
        self.note("watcher_left", conn=self.link.conn, peer=self.link.peer, why=why,
                  duration_ms=round((time.monotonic() - self.joined) * 1000, 1))  # fmt: skip
        if self.reader is not gevent.getcurrent():
            self.reader.kill(block=False)
        sent = self.outbox.close(close(code, text or why) if code else b"", drop, LINGER_S)
        sock = self.link.sock
        if code and sent and not self.link.stream.torn:
            with contextlib.suppress(OSError):  # the close frame went out: a FIN after it
                sock.shutdown(stdsocket.SHUT_WR)
            sock.close()
        else:
            reset(sock)
        self.link.ended()


class Watchers:
    """A session's watchers, and the token that lets them in."""

    __slots__ = ("share", "limit", "token", "members", "joined", "note")

    def __init__(self, share: str, limit: int, note: Note) -> None:
        self.share, self.limit, self.note = share, limit, note
        self.token = new_token()  # in the driver's answer only: never logged
        self.members: list[Watcher] = []
        self.joined = 0

    def join(self, link: Link, first: list[bytes], typing: Callable[[bytes], None]) -> None:
        """A new watcher: `first` (its answer and the kept output, as frames) before any live output."""
        self.members = [w for w in self.members if w.why is None]
        watcher = Watcher(link, typing if self.share == "read-write" else None, self.limit, first, self.note)
        self.members.append(watcher)
        self.joined += 1
        self.note("watcher_joined", conn=link.conn, peer=link.peer, share=self.share,
                  watchers=len(self.members))  # fmt: skip

    def offer(self, data: memoryview | bytes) -> None:
        for watcher in self.members:
            if watcher.why is None and not watcher.offer(data):
                gevent.spawn(watcher.end, "fell_behind", CLOSE_CODES["fell_behind"])

    def close(self, code: int, why: str) -> None:
        """The session's end: each watcher gets what is queued, then the session's close frame."""
        members = [w for w in self.members if w.why is None]
        gevent.joinall([gevent.spawn(w.end, "session_end", code, False, why) for w in members])
        self.members = []
