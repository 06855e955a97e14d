"""One greenlet that calls a function every interval until stopped (the watchdog, the
guard, the metrics flusher)."""

from __future__ import annotations

from collections.abc import Callable

import gevent


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
