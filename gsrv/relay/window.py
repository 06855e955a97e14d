"""A WebSocket session's output window (typed framing, opt-in): a client that acknowledges
what it rendered ("a" messages: the count of output bytes so far) gets at most `size` bytes
sent and not acknowledged; then gsrv stops reading the child, which blocks on its write
(backpressure into the program, not a pile of pending writes in the page). A client that never
acknowledges gets no window: today's typed framing, unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gevent.event import Event

from gsrv.relay.wsframes import ProtocolError

POLL_S = 0.1  # while the window is full: how often to look whether the client's input is stuck
ACK_MAX = 20  # "a" + the digits of a byte count


class Window:
    """Output bytes sent ("o" messages, the type byte not counted) and acknowledged."""

    __slots__ = ("size", "sent", "acked", "on", "_acked")

    def __init__(self, size: int) -> None:
        self.size = size
        self.sent = 0
        self.acked = 0
        self.on = False  # the client acknowledges: from its first "a" message on
        self._acked = Event()

    def ack(self, text: bytes) -> None:
        """An "a" message's payload: the output rendered so far, in bytes."""
        if not text.isdigit() or len(text) > ACK_MAX:
            raise ProtocolError(f'an acknowledgement must be "a" and a byte count (got "a{text[:24]!r}")', 1008)
        offset = int(text)
        if offset > self.sent:
            raise ProtocolError(f"an acknowledgement of {offset} bytes, past the {self.sent} sent", 1008)
        self.on = True
        if offset > self.acked:
            self.acked = offset
            self._acked.set()

    def room(self, chunk: int, stuck: Callable[[], bool]) -> tuple[int, float]:
        """How much output to read now, and the seconds it waited for an acknowledgement. A
        client whose input waits behind a child that does not read (`stuck`) may have its
        acknowledgements queued behind that input: the window does not hold then (TCP's own
        backpressure still bounds gsrv)."""
        waited = 0.0
        while self.on and self.sent - self.acked >= self.size and not stuck():
            started = time.monotonic()
            self._acked.clear()
            self._acked.wait(POLL_S)
            waited += time.monotonic() - started
        if not self.on or stuck():
            return chunk, waited
        return min(chunk, self.size - (self.sent - self.acked)), waited
