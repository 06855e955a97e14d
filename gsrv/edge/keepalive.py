"""HTTP connections between requests: each waits for its next request's first byte with an io
watcher and a timer, no greenlet, no slot and no child (thousands cost memory only). Readable,
it goes back to its service's gate (`knock`); after `between_requests`, or at a drain, it ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import gevent
from gevent import get_hub

from gsrv.edge.arrival import Arrival
from gsrv.edge.refusal import fin_and_drain
from gsrv.loop import READ


class Waiting:
    """One kept-alive connection's watchers."""

    __slots__ = ("arrival", "io", "timer")

    def __init__(self, arrival: Arrival, seconds: float) -> None:
        loop = get_hub().loop
        self.arrival = arrival
        self.io = loop.io(arrival.sock.fileno(), READ)
        self.timer = loop.timer(seconds)

    def stop(self) -> None:
        for watcher in (self.io, self.timer):
            watcher.stop()
            watcher.close()


class KeepAlive:
    """A service's connections between requests; `knock(arrival)` when a request comes."""

    def __init__(self, knock: Callable[[Arrival], None]) -> None:
        self.knock = knock
        self.waiting: dict[Arrival, Waiting] = {}

    def __len__(self) -> int:
        return len(self.waiting)

    def wait(self, arrival: Arrival, seconds: float) -> None:
        """Until the next request's first byte (at once if the client already sent it)."""
        http = arrival.http
        if http is not None and http.buffered or arrival.tls is not None and arrival.tls.buffered:
            self.knock(arrival)  # pipelined: the next request is read already (TLS: in its buffers)
            return
        waiting = Waiting(arrival, seconds)
        self.waiting[arrival] = waiting
        waiting.io.start(self._readable, arrival)
        waiting.timer.start(self._expired, arrival)

    def _readable(self, arrival: Arrival) -> None:
        waiting = self.waiting.pop(arrival, None)
        if waiting is not None:
            waiting.stop()
            self.knock(arrival)

    def _expired(self, arrival: Arrival) -> None:
        waiting = self.waiting.pop(arrival, None)
        if waiting is not None:
            waiting.stop()
            gevent.spawn(close, arrival)  # in a greenlet: TLS's close_notify may wait to send

    def close_all(self) -> None:
        """A drain: every connection between requests ends now (a FIN)."""
        while self.waiting:
            arrival, waiting = self.waiting.popitem()
            waiting.stop()
            close(arrival)


def close(arrival: Arrival) -> None:
    """End a connection between requests: a FIN, what it sent meanwhile read, then close."""
    if arrival.http is not None and arrival.http.secure and arrival.tls is not None:
        with contextlib.suppress(OSError):
            arrival.tls.close_notify()
    fin_and_drain(arrival.sock)
    arrival.ended()
