"""HTTP connections between requests: each waits for its next request's first byte with an io
watcher and a timer, no greenlet, no slot and no child (thousands cost memory only). Readable,
it goes back to its service's gate (`knock`); after `between_requests`, or at a drain, it ends.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import gevent
from gevent import get_hub

from gsrv.edge.arrival import Visit
from gsrv.edge.refusal import fin_and_drain
from gsrv.loop import READ


class Waiting:
    """One kept-alive connection's watchers."""

    __slots__ = ("visit", "io", "timer", "until")

    def __init__(self, visit: Visit, seconds: float) -> None:
        loop = get_hub().loop
        self.visit = visit
        self.until = time.monotonic() + seconds  # its between_requests ends then
        self.io = loop.io(visit.sock.fileno(), READ)
        self.timer = loop.timer(seconds)

    def stop(self) -> None:
        for watcher in (self.io, self.timer):
            watcher.stop()
            watcher.close()


class KeepAlive:
    """A service's connections between requests; `knock(visit)` when a request comes."""

    def __init__(self, knock: Callable[[Visit], None]) -> None:
        self.knock = knock
        self.waiting: dict[Visit, Waiting] = {}

    def __len__(self) -> int:
        return len(self.waiting)

    def wait(self, visit: Visit, seconds: float) -> None:
        """Until the next request's first byte (at once if the client already sent it)."""
        http, tls = visit.prelude.http, visit.prelude.tls
        if http is not None and http.buffered or tls is not None and tls.buffered:
            self.knock(visit)  # pipelined: the next request is read already (TLS: in its buffers)
            return
        waiting = Waiting(visit, seconds)
        self.waiting[visit] = waiting
        waiting.io.start(self._readable, visit)
        waiting.timer.start(self._expired, visit)

    def _readable(self, visit: Visit) -> None:
        waiting = self.waiting.pop(visit, None)
        if waiting is not None:
            waiting.stop()
            self.knock(visit)

    def _expired(self, visit: Visit) -> None:
        waiting = self.waiting.pop(visit, None)
        if waiting is not None:
            waiting.stop()
            gevent.spawn(close, visit)  # in a greenlet: TLS's close_notify may wait to send

    def idle(self) -> list[tuple[Visit, float]]:
        """The connections between requests and the seconds each has left (an upgrade moves them)."""
        now = time.monotonic()
        return [(visit, max(0.0, waiting.until - now)) for visit, waiting in self.waiting.items()]

    def close_tls(self) -> None:
        """An upgrade: those over TLS end now, as a drain ends them (their state cannot move)."""
        for visit in [v for v in self.waiting if v.prelude.tls is not None]:
            self.waiting.pop(visit).stop()
            gevent.spawn(close, visit)

    def close_all(self) -> None:
        """A drain: every connection between requests ends now (a FIN)."""
        while self.waiting:
            visit, waiting = self.waiting.popitem()
            waiting.stop()
            close(visit)


def close(visit: Visit) -> None:
    """End a connection between requests: a FIN, what it sent meanwhile read, then close."""
    tls = visit.prelude.tls
    if tls is not None:
        with contextlib.suppress(OSError):
            tls.close_notify()
    fin_and_drain(visit.sock)
    visit.arrival.ended()
