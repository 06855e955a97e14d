"""One greenlet for all sessions: finds clients the kernel knows are gone though no pump noticed.

A pump parked in a write to a child that never reads cannot see the client's RST.
"""

from __future__ import annotations

from typing import Protocol

from gsrv.periodic import Periodic, in_slices

INTERVAL_S = 1.0


class Watched(Protocol):
    def peer_is_dead(self) -> bool: ...
    def abort(self, reason: str) -> None: ...


class Watchdog:
    def __init__(self, interval: float = INTERVAL_S) -> None:
        self.interval = interval
        self._sessions: set[Watched] = set()
        self._ticker = Periodic(self._sweep, lambda: self.interval)

    def add(self, session: Watched) -> None:
        self._sessions.add(session)

    def discard(self, session: Watched) -> None:
        self._sessions.discard(session)

    def start(self) -> None:
        self._ticker.start()

    def stop(self) -> None:
        self._ticker.stop()

    def _sweep(self) -> None:
        for session in in_slices(list(self._sessions)):
            if session in self._sessions and session.peer_is_dead():  # not one that ended meanwhile
                session.abort("client_reset")
