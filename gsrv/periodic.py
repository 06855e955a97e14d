"""One greenlet that calls a function every interval until stopped (the watchdog, the
guard, the metrics flusher); and `in_slices`, for work over every session (a sweep, the
operator's listing) that must leave the loop to the relays while it walks 10,000 of them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import gevent

SLICE_S = 0.0005  # work over many sessions runs this long at most before the relays get the loop
LOOP_SHARE = 0.1  # and takes at most this share of the loop's time while it runs

T = TypeVar("T")


class Periodic:
    def __init__(self, tick: Callable[[], None], interval: Callable[[], float]) -> None:
        self.tick, self.interval = tick, interval  # interval is read anew each time: a reload may change it
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._loop)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()
            self._greenlet = None

    def _loop(self) -> None:
        while True:
            gevent.sleep(self.interval())
            self.tick()


def in_slices(items: Iterable[T], share: float = LOOP_SHARE) -> Iterator[T]:
    """`items`, one at a time, with the loop given away between slices: after each SLICE_S of
    work (the caller's, between items, counts) the relays run until the loop has nothing else
    to do, but no longer than the work may wait while they keep the loop busy (it then has
    `share` of the loop's time). A relay waits at most a slice; on an idle loop a walk of
    10,000 sessions goes at full speed, on a busy one it stalls nothing."""
    began = time.perf_counter()
    for item in items:
        yield item
        spent = time.perf_counter() - began
        if spent >= SLICE_S:
            with gevent.Timeout(spent * (1 - share) / share, False):
                gevent.idle()
            began = time.perf_counter()
