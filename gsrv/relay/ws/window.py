"""A WebSocket session's output window (typed framing, opt-in): a client that acknowledges
what it rendered ("a" messages: the count of output bytes so far) gets at most `size` bytes
sent and not acknowledged; then gsrv stops reading the child, which blocks on its write
(backpressure into the program, not a pile of pending writes in the page). A client that never
acknowledges gets no window: today's typed framing, unchanged.

With reattach (relay/ws/reattach.py) the window also keeps the bytes it counts: the output sent and
not acknowledged, for a page that reconnects to get again from the offset it has.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator

from gevent.event import Event

from gsrv.edge.httphead import quoted
from gsrv.edge.wsframes import ProtocolError

POLL_S = 0.1  # while the window is full: how often to look whether the client's input is stuck
ACK_MAX = 20  # "a" + the digits of a byte count


class Window:
    """Output bytes sent ("o" messages, the type byte not counted) and acknowledged."""

    __slots__ = ("size", "sent", "acked", "on", "_acked", "kept", "base", "_skip")

    def __init__(self, size: int) -> None:
        self.size = size
        self.sent = 0
        self.acked = 0
        self.on = False  # the client acknowledges: from its first "a" message on (the terminal page: its hello)
        self._acked = Event()
        self.kept: deque[bytes] | None = None  # with reattach: the output from `base` on, as sent
        self.base = 0  # the offset of the first byte kept: `acked`, unless the window could not hold (room)
        self._skip = 0  # bytes of kept[0] before `base`

    def keep(self) -> None:
        """Keep the bytes from now on (reattach), and hold the window from the start."""
        self.on, self.kept = True, deque()

    def sending(self, data: memoryview | bytes) -> None:
        """Output about to go to the client (or, detached, nowhere yet): counted, and kept; at
        most `size` bytes kept, whatever room() let through."""
        self.sent += len(data)
        if self.kept is not None:
            self.kept.append(bytes(data))
            if self.sent - self.base > self.size:
                self._forget(self.sent - self.size)

    def handed_over(self) -> dict[str, object]:
        """Its counts and the output it keeps (an upgrade carries them, base64 being the record's)."""
        return {"sent": self.sent, "acked": self.acked, "on": self.on, "base": self.base, "skip": self._skip,
                "kept": None if self.kept is None else [bytes(piece) for piece in self.kept]}  # fmt: skip

    def take_over(self, sent: int, acked: int, on: bool, base: int, skip: int, kept: list[bytes] | None) -> None:
        self.sent, self.acked, self.on, self.base, self._skip = sent, acked, on, base, skip
        self.kept = None if kept is None else deque(kept)

    def ack(self, text: bytes) -> None:
        """An "a" message's payload: the output rendered so far, in bytes."""
        if not text.isdigit() or len(text) > ACK_MAX:
            raise ProtocolError(
                f'an acknowledgement must be "a" and a byte count (got {quoted(b"a" + text[:24])})', 1008
            )
        offset = int(text)
        if offset > self.sent:
            raise ProtocolError(f"an acknowledgement of {offset} bytes, past the {self.sent} sent", 1008)
        self.on = True
        if offset > self.acked:
            self.acked = offset
            self._forget(offset)
            self._acked.set()

    def resume(self, offset: int) -> int:
        """A reconnected page has the output up to `offset`: where what follows starts (from
        the oldest byte kept, for a page that has less than that: a reloaded one)."""
        if offset > self.sent:
            raise ProtocolError(f"a reattach at offset {offset}, past the {self.sent} bytes of output sent", 1008)
        if offset > self.acked:
            self.ack(str(offset).encode())
        return max(offset, self.base)

    def since(self, offset: int) -> Iterator[memoryview]:
        """The kept output from `offset` (at least `base`) on."""
        skip = self._skip + offset - self.base
        for piece in list(self.kept or ()):
            if skip < len(piece):
                yield memoryview(piece)[skip:]
            skip = max(skip - len(piece), 0)

    def _forget(self, offset: int) -> None:
        """Drop what is kept before `offset`."""
        kept = self.kept
        if kept is None or offset <= self.base:
            return
        count, self.base = self._skip + offset - self.base, offset
        while kept and count >= len(kept[0]):
            count -= len(kept.popleft())
        self._skip = count if kept else 0

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
