"""One client's bounded queue of a shared output, whatever the transport: whole items in order,
at most `limit` bytes waiting, sent by a greenlet of its own. An offer that does not fit says
so, and the owner evicts that client, so a slow reader never holds the output or the child
back (the WebSocket watchers' today, relay/ws/watchers.py; any transport's shared session's).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

import gevent
from gevent.event import Event

Send = Callable[[bytes], object]  # the client's connection: sends one whole item, raises OSError


class Outbox:
    """The queue and its sender. `failed` is called (in the sender) when a send raised."""

    __slots__ = ("send", "limit", "queue", "queued", "wake", "closing", "failed", "sender")

    def __init__(self, send: Send, limit: int, failed: Callable[[], None], first: Iterable[bytes] = ()) -> None:
        self.send, self.limit, self.failed = send, limit, failed
        self.queue: deque[bytes] = deque(first)  # whole items, in order
        self.queued = sum(len(item) for item in self.queue)
        self.wake = Event()
        self.closing = False  # no more offers: what is left goes, then the sender ends
        self.sender = gevent.spawn(self._run)

    def offer(self, item: bytes) -> bool:
        """A piece of the shared output; False when it does not fit (the client fell behind)."""
        if self.queued + len(item) > self.limit:
            return False
        self.put(item)
        return True

    def put(self, item: bytes) -> None:
        """An item of the client's own exchange (an answer to it, its close): never refused."""
        self.queue.append(item)
        self.queued += len(item)
        self.wake.set()

    def _run(self) -> None:
        try:
            while self.queue or not self.closing:
                while self.queue:
                    item = self.queue.popleft()
                    self.queued -= len(item)
                    self.send(item)
                self.wake.clear()
                if not self.closing:
                    self.wake.wait()
        except OSError:
            self.failed()

    def close(self, last: bytes, drop: bool, linger: float) -> bool:
        """No more offers: what waits is dropped (`drop`), `last` goes after what is left, and
        the sender has `linger` seconds for it all. Whether everything went out; if not, the
        sender is stopped (unless it is the caller)."""
        self.closing = True
        if drop:
            self.queue.clear()
            self.queued = 0
        if last:
            self.put(last)
        self.wake.set()
        current = gevent.getcurrent()
        if self.sender is not current:
            self.sender.join(linger)
        sent = self.sender.dead and not self.queue
        if not sent and self.sender is not current:
            self.sender.kill(block=False)
        return sent
