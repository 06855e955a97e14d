"""What gsrv uses of gevent's event loop itself, declared once (gevent ships no types): the io
watcher's event masks, and a Protocol for the watchers gsrv holds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

READ, WRITE = 1, 2  # libev's EV_READ, EV_WRITE: what loop.io(fd, events) takes


class Watcher(Protocol):
    """An io, timer or child watcher of gevent's loop, as gsrv starts and stops it."""

    def start(self, callback: Callable[..., None], *args: object) -> None: ...
    def stop(self) -> None: ...


class ChildWatcher(Watcher, Protocol):
    """loop.child(pid): once it fired, the pid that changed state and its wait() status."""

    rpid: int
    rstatus: int
