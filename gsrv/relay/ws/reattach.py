"""A terminal page's session that outlives its connection (`reattach = DURATION`, with the
page's gsrv-term protocol, edge/hello.py).

When the connection drops without a close frame (the client's end or reset, a failed send, a
ping without its pong, the watchdog), the session goes on detached for up to `reattach`
(ending.py then ends it: reattach_expired); its output is kept from the offset the page last
acknowledged (relay/ws/window.py: at most reattach_buffer, then the child blocks on its write).
A new connection with the session's token takes the seat: gsrv answers its hello, sends the
kept output from the offset the page has, then the live stream. One that comes while the old
connection still lives takes it over: the old one gets a close frame 4409.

`Seat` is the one owner of which connection a session's client is, and of the order of what
goes out on it: output, its replay and control frames go out under `sending`.
"""

from __future__ import annotations

import contextlib
import socket as stdsocket
import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent
from gevent.event import Event
from gevent.lock import Semaphore
from gevent.socket import socket

from gsrv.edge.hello import CLOSE_CODES, new_token
from gsrv.edge.refusal import reset
from gsrv.edge.stream import Stream
from gsrv.edge.wsframes import FrameReader, close

CLOSE_FRAME_S = 1.0  # a taken-over connection's close frame: how long it may take to go out


@dataclass(frozen=True)
class Link:
    """One connection of a session's client."""

    sock: socket
    stream: Stream
    reader: FrameReader  # the frames after the hello
    conn: str = ""  # the connection's own id (the visit's sid), for the log; "": the session's first
    peer: str = ""
    ended: Callable[[], None] = lambda: None  # its arrival's end hooks (the per-address counts)


class Seat:
    """Which connection is a session's client now, if any, and since when none."""

    __slots__ = ("reattach", "token", "link", "first", "detached_since", "attached", "sending", "drops", "ended")

    def __init__(self, link: Link, reattach: float) -> None:
        self.reattach = reattach
        self.token = new_token()  # sent in the hello's answer only: never logged
        self.link = self.first = link
        self.detached_since: float | None = None
        self.attached = Event()
        self.attached.set()
        self.sending = Semaphore()  # output, its replay and control frames, in order
        self.drops = 0
        self.ended = False  # the session is ending: no connection takes it now

    def moved(self, token: str, drops: int) -> None:
        """An upgrade's new code: the session's token as the page has it, its connection gone
        with the previous code (the page reconnects: a close without a close frame, 1006)."""
        self.token, self.drops = token, drops + 1
        self.detached_since = time.monotonic()
        self.attached.clear()

    @property
    def detached(self) -> bool:
        return self.detached_since is not None

    def lost(self, stream: Stream, why: str) -> bool:
        """The connection of `stream` is gone (or, `why` = "taken_over", is being replaced):
        detach, once; True when this call did. A connection replaced already needs nothing."""
        link = self.link
        if link.stream is not stream or self.detached:
            return False
        self.detached_since = time.monotonic()
        self.attached.clear()
        self.drops += 1
        if why == "taken_over" and not stream.torn and self.sending.acquire(blocking=False):
            try:  # a frame in progress would be torn by another: only when none is
                with contextlib.suppress(OSError), gevent.Timeout(CLOSE_FRAME_S, False):
                    stream.send(close(CLOSE_CODES["taken_over"], why))
                    link.sock.shutdown(stdsocket.SHUT_WR)
            finally:
                self.sending.release()
            link.sock.close()
        else:
            reset(link.sock)
        if link is not self.first:
            link.ended()  # (the first connection's are the session's own: at its end)
        return True

    def take(self, link: Link) -> None:
        """A new connection is the client now (under `sending`, after `lost` for the old one)."""
        self.link, self.detached_since = link, None

    def ready(self) -> None:
        """Its hello answered and the kept output replayed: input may flow again."""
        self.attached.set()

    def finish(self) -> None:
        """The session's end: the last connection's own end hooks."""
        if self.link is not self.first:
            self.link.ended()
