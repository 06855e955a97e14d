"""Admission for one listener: max_sessions, pauses (draining, accept errors, later memory).

The only caller of start_accepting/stop_accepting, gevent's own paths back to them included:
spawn never raises and accept errors pause accepting instead of arming gevent's retry timer.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import gevent
from gevent.server import StreamServer

from gsrv.logs import Log

RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
ACCEPT_RETRY_S = 1.0


def may_accept(active: int, limit: int, paused: set[str] | frozenset[str]) -> bool:
    """The gate's decision, as a pure function."""
    return not paused and active < limit


class Listener(StreamServer):  # type: ignore[misc]
    """A StreamServer whose accept loop answers to a Gate."""

    def __init__(self, sock: Any, handle: Callable[..., None], gate: Gate) -> None:
        super().__init__(sock, handle)
        self.gate = gate
        self.full = gate.full  # gevent consults this before each accept()

    def do_read(self) -> Any:
        try:
            return super().do_read()
        except OSError as e:
            self.gate.accept_failed(e)
            return None

    def do_handle(self, *args: Any) -> None:
        self.gate.spawn(self._handle, *args)


class Gate:
    """Counts sessions and opens or closes its listener's accept loop."""

    def __init__(self, name: str, max_sessions: int, log: Log) -> None:
        self.name = name
        self.max_sessions = max_sessions
        self.log = log
        self.active = 0
        self.paused: set[str] = set()
        self.listener: Listener | None = None
        self._retry: gevent.Greenlet | None = None

    def attach(self, listener: Listener) -> None:
        self.listener = listener

    def full(self) -> bool:
        return not may_accept(self.active, self.max_sessions, self.paused)

    def set_limit(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self.update()

    def pause(self, reason: str) -> None:
        self.paused.add(reason)
        self.update()

    def resume(self, reason: str) -> None:
        self.paused.discard(reason)
        self.update()

    def update(self) -> None:
        listener = self.listener
        if listener is None or listener.closed or not listener.started:
            return
        if self.full():
            listener.stop_accepting()
        else:
            listener.start_accepting()

    def spawn(self, handle: Callable[..., None], sock: Any, address: Any) -> None:
        """Run one session in its own greenlet; never raises (gevent would re-arm accept)."""
        self.active += 1
        try:
            gevent.spawn(self._run, handle, sock, address)
        except Exception as e:
            self.active -= 1
            self.log.error("spawn_failed", service=self.name, error=str(e))
            sock.close()

    def _run(self, handle: Callable[..., None], sock: Any, address: Any) -> None:
        try:
            handle(sock, address)
        finally:
            sock.close()
            self.active -= 1
            if "accept_error" in self.paused:
                self.paused.discard("accept_error")  # a session ended: an fd is free again
            self.update()

    def accept_failed(self, error: OSError) -> None:
        if error.errno not in RESOURCE_ERRORS:
            self.log.debug("accept_error", service=self.name, error=str(error))
            return
        if "accept_error" in self.paused:
            return
        self.log.warning(
            "accept_paused", service=self.name, reason="accept_error", error=error.strerror,
            next="retry when a session ends or in 1s",
        )  # fmt: skip
        self.pause("accept_error")
        if self._retry is None or self._retry.dead:
            self._retry = gevent.spawn_later(ACCEPT_RETRY_S, self.resume, "accept_error")
